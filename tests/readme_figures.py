"""Every figure the README quotes from a run, measured again and printed (a script; pytest does not
collect it). Compare its output with the README.

    python tests/readme_figures.py              # the smoke run (about 40 s on 2 cores)
    python tests/readme_figures.py --demo       # and the 8-minute demo, seeds 0 and 1 (about 16 min)
    python tests/readme_figures.py --tests      # and the test suite's count and time

Runs the README's own commands in a temporary folder (the shipped data/eurosat_ms_sample) and reads
the figures from the runs' metrics.json files; times are wall-clock seconds of each stage, memory the
peak resident memory of each stage's process (Linux).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "eurosat_ms_sample")
SMOKE = [["01_patch_clip.py", "--model", "ViT-S-32", "--pretrained", "none", "--data", "eurosat_ms", "--root", SAMPLE,
          "--epochs", "1", "--batch-size", "32", "--out", "{o}/patch"],
         ["02_align_s2.py", "--teacher", "{o}/patch", "--root", SAMPLE, "--input-size", "64", "--epochs", "1",
          "--batch-size", "32", "--out", "{o}/align"],
         ["03_eval.py", "--ckpt", "{o}/align", "--out", "{o}/eval"]]
DEMO = [["01_patch_clip.py", "--model", "ViT-S-32", "--pretrained", "none", "--data", "eurosat_ms", "--root", SAMPLE,
         "--epochs", "25", "--lr", "3e-4", "--wd", "0.05", "--batch-size", "35", "--alphas", "0", "0.5", "1",
         "--alpha", "1", "--out", "{o}/patch"],
        ["02_align_s2.py", "--teacher", "{o}/patch", "--root", SAMPLE, "--input-size", "64", "--epochs", "40",
         "--lr", "5e-4", "--batch-size", "35", "--out", "{o}/align"],
        ["03_eval.py", "--ckpt", "{o}/align", "--out", "{o}/eval"]]


def run_stages(commands, out, extra=()):
    """Run the stages one after another in `out`; returns [(seconds, peak memory in GB)] per stage."""
    figures = []
    for command in commands:
        argv = [sys.executable, os.path.join(ROOT, command[0]), *[a.format(o=out) for a in command[1:]],
                "--results", f"{out}/results.jsonl"] if command[0] == "03_eval.py" else \
            [sys.executable, os.path.join(ROOT, command[0]), *[a.format(o=out) for a in command[1:]], *extra]
        start = time.time()
        _, status, usage = os.wait4(subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=out).pid, 0)
        if status:
            sys.exit(f"{' '.join(argv)} failed")
        figures.append((time.time() - start, usage.ru_maxrss / 1e6))  # Linux: kilobytes -> GB
    return figures


def evaluation(out):
    m = json.load(open(os.path.join(out, "eval", "metrics.json")))["metrics"]
    return m["zeroshot"], m["cross_modal"], m["modality_gap"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="also the 8-minute demo, seeds 0 and 1")
    p.add_argument("--tests", action="store_true", help="also run the test suite: its count and time")
    args = p.parse_args()
    if not os.path.isdir(SAMPLE):
        sys.exit(f"{SAMPLE} is not here: these figures are measured on the shipped EuroSAT MS sample")
    with tempfile.TemporaryDirectory() as tmp:
        times = run_stages(SMOKE, tmp)
        zs, cm, gap = evaluation(tmp)
        print("smoke run: seconds per stage " + " / ".join(f"{t:.1f}" for t, _ in times)
              + f" ({sum(t for t, _ in times):.0f} in all); peak memory, GB: "
              + " / ".join(f"{m:.1f}" for _, m in times))
        print(f"  top-1 on {json.load(open(os.path.join(tmp, 'eval', 'metrics.json')))['n_images']} test scenes: "
              f"CLIP {zs['clip_rgb']['acc1']:.2f}, student {zs['student_ms']['acc1']:.2f}")
        print(f"  centroid distance {gap['before']['centroid_distance']:.4f} -> {gap['after']['centroid_distance']:.4f}; "
              f"true-pair cosine {gap['before']['true_pair_cosine']:.3f} -> {gap['after']['true_pair_cosine']:.3f}; "
              f"random-pair cosine {gap['before']['random_pair_cosine']:.3f} -> {gap['after']['random_pair_cosine']:.3f}")
        for seed in (0, 1) if args.demo else ():
            out = os.path.join(tmp, f"demo{seed}")
            os.makedirs(out)
            times = run_stages(DEMO, out, ["--seed", str(seed)])
            zs, cm, gap = evaluation(out)
            print(f"demo, seed {seed}: top-1 patched CLIP {zs['clip_rgb']['acc1']:.3f}, student "
                  f"{zs['student_ms']['acc1']:.3f}; recall@1 MS->RGB / RGB->MS {cm['ms_to_rgb']['recall@1']:.3f} / "
                  f"{cm['rgb_to_ms']['recall@1']:.3f}; true / random pair cosine {gap['after']['true_pair_cosine']:.3f}"
                  f" / {gap['after']['random_pair_cosine']:.3f}; centroid distance "
                  f"{gap['before']['centroid_distance']:.3f} -> {gap['after']['centroid_distance']:.3f}; seconds "
                  + " / ".join(f"{t:.0f}" for t, _ in times))
    if args.tests:
        start = time.time()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests"], cwd=ROOT, capture_output=True, text=True)
        print(f"tests: {done.stdout.strip().splitlines()[-1]} ({time.time() - start:.0f} s with start-up)")


if __name__ == "__main__":
    main()
