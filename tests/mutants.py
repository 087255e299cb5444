"""The mutation check: six mistakes in the method, each applied alone to a copy of the project,
must each make the test suite fail (a script; pytest does not collect it).

    python tests/mutants.py            # each mutant against the test files that should catch it
    python tests/mutants.py --all      # each mutant against the whole suite (slower)

Prints one line per mutant: caught (and the first failing test) or SURVIVED; exits 1 if any
survived, or if a mutant's text is no longer in the code (update MUTANTS with the code).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, file, original text, mutated text, test files that should catch it)
MUTANTS = [
    ("interpolation weights swapped", "01_patch_clip.py",
     "(1 - alpha) * w0 + alpha * w1", "alpha * w0 + (1 - alpha) * w1", ["test_stage1.py"]),
    ("RGB band order reversed", "common.py",
     'RGB_BANDS = ("B04", "B03", "B02")', 'RGB_BANDS = ("B02", "B03", "B04")', ["test_data.py"]),
    ("logits from unnormalised embeddings", "common.py",
     "F.normalize(features.float(), dim=-1) @ head", "features.float() @ head",
     ["test_eval.py", "test_stage1.py"]),
    ("recall@k off by one", "03_eval.py", "(ranks < k)", "(ranks <= k)", ["test_eval.py"]),
    ("the CE term replaced by MSE", "02_align_s2.py", "ce = F.cross_entropy(logits, labels)",
     "ce = F.mse_loss(logits, F.one_hot(labels, logits.shape[1]).float())", ["test_stage2.py"]),
    ("mAP counting classes without positives as 0", "common.py",
     "return aps.nanmean().item(), aps", "return aps.nan_to_num(0.0).mean().item(), aps",
     ["test_eval.py"]),
]


def project_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in listed.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="run the whole suite for each mutant")
    args = p.parse_args()
    survived = 0
    for name, file, original, mutated, tests in MUTANTS:
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "project")
            shared = os.path.join(ROOT, "..", "shared")
            if os.path.isdir(shared):  # the real-data tests find it beside the copy
                os.symlink(os.path.abspath(shared), os.path.join(tmp, "shared"))
            for f in project_files():
                os.makedirs(os.path.dirname(os.path.join(copy, f)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, f), os.path.join(copy, f))
            path = os.path.join(copy, file)
            text = open(path).read()
            if text.count(original) != 1:
                sys.exit(f"{name}: {original!r} is not once in {file}; update MUTANTS")
            with open(path, "w") as f:
                f.write(text.replace(original, mutated))
            selection = ["tests"] if args.all else [os.path.join("tests", t) for t in tests]
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                                     "no:cacheprovider", *selection], cwd=copy,
                                    capture_output=True, text=True)
            failed = re.findall(r"^FAILED (\S+)", result.stdout, re.M)
            if result.returncode == 0:
                survived += 1
                print(f"SURVIVED  {name} ({file})")
            else:
                print(f"caught    {name} ({file}): {failed[0] if failed else result.stdout[-200:]}")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
