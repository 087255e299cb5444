"""Run folders: a run writes into OUT.partial and publishes OUT only when finished, so a refused,
failed or stopped run never touches a finished run (nor another run's OUT.partial); a --resume
continues only the run that saved last.pt (same flags, training list and teacher) and gives the
results of an uninterrupted run; a stop anywhere is one line and exit 130, with a hint that works."""
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal

import pytest
import torch
from conftest import TINY_CLIP, TINY_STUDENT, hash_split, load_stage, make_eurosat_ms, make_eurosat_rgb

import common as C

patch = load_stage("01_patch_clip.py")
align = load_stage("02_align_s2.py")
evaluate = load_stage("03_eval.py")


def small_ms(folder):
    """24 tifs of 3 classes (17 train: 2 steps an epoch at batch size 8, 1 at 16)."""
    return make_eurosat_ms(folder, per_class=8, classes=["Forest", "River", "SeaLake"], size=32)


def patch_args(root, out, *extra):
    return ["--model", TINY_CLIP, "--pretrained", "none", "--data", "eurosat_ms", "--root", str(root),
            "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--alphas", "0", "0.5", "1",
            "--no-plots", "--out", str(out), *extra]


def align_args(teacher, root, out, *extra):
    return ["--teacher", str(teacher), "--root", str(root), *TINY_STUDENT, "--epochs", "2", "--batch-size", "16",
            "--lr", "1e-3", "--workers", "0", "--no-plots", "--out", str(out), *extra]


def eval_args(ckpt, out, results, *extra):
    return ["--ckpt", str(ckpt), "--workers", "0", "--no-plots", "--out", str(out), "--results", str(results), *extra]


def stopped(capsys, stage, argv, code=130):
    """Run a stage that is expected to stop; returns its one non-empty stderr line."""
    with pytest.raises(SystemExit) as e:
        stage.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, lines
    assert lines[0].startswith("stopped: " if code == 130 else "error: "), lines
    return lines[0]


def sigterm_when(monkeypatch, module, name, condition):
    """Send this process a real SIGTERM when module.name is called and condition(call number) holds."""
    original, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if condition(calls["n"]):
            signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def tree(folder):
    """Every file under folder: relative path -> SHA-256 of its bytes (an empty dict for no folder)."""
    files = {}
    for path in glob.glob(os.path.join(str(folder), "**"), recursive=True):
        if os.path.isfile(path):
            files[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return files


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def student_equal(a, b):
    ra, rb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    sa, sb = ra.pop("state_dict"), rb.pop("state_dict")
    return ra == rb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Small EuroSAT MS tifs and a finished stage-1 run on them (1 epoch, alpha 0)."""
    base = tmp_path_factory.mktemp("small")
    root = small_ms(base / "ms")
    patch.main(patch_args(root, base / "teacher", "--epochs", "1", "--alphas", "0"))
    return {"root": root, "teacher": base / "teacher", "base": base}


@pytest.fixture(scope="module")
def aligned(small):
    """A finished, uninterrupted 2-epoch stage-2 run on the small teacher (the reference for resumes)."""
    out = small["base"] / "aligned"
    align.main(align_args(small["teacher"], small["root"], out))
    return out


# ----------------------------------------------------------------------------- resume: same run, same results


def test_resume_continues_only_the_run_that_saved_last_pt(tmp_path, capsys, monkeypatch):
    root, out = small_ms(tmp_path / "ms"), tmp_path / "run"
    partial = tmp_path / "run.partial"
    sigterm_when(monkeypatch, C, "check_finite", lambda n: n == 3)  # run A: stopped in its 2nd epoch
    line = stopped(capsys, patch, patch_args(root, out, "--lr", "1e-3"))
    assert "last.pt" in line and "--resume" in line
    monkeypatch.undo()
    assert os.path.isfile(partial / "last.pt") and not os.path.exists(out)
    # a fresh run B may not silently discard A's last.pt ...
    line = stopped(capsys, patch, patch_args(root, out, "--lr", "1e-5"), code=2)
    assert "unfinished run" in line and "--resume" in line and "--overwrite" in line
    assert torch.load(partial / "last.pt", weights_only=True)["identity"]["lr"] == 1e-3
    # ... with --overwrite it starts afresh, and a stop in its 2nd epoch leaves B's own last.pt
    sigterm_when(monkeypatch, C, "check_finite", lambda n: n == 3)
    stopped(capsys, patch, patch_args(root, out, "--lr", "1e-5", "--overwrite"))
    monkeypatch.undo()
    last = torch.load(partial / "last.pt", weights_only=True)
    assert last["identity"]["lr"] == 1e-5 and last["epoch"] == 0
    line = stopped(capsys, patch, patch_args(root, out, "--lr", "1e-3", "--resume"), code=2)  # A's flags
    assert "--lr was 1e-05" in line
    patch.main(patch_args(root, out, "--lr", "1e-5", "--resume"))  # (equal to an uninterrupted run: test_stage1)
    assert json.load(open(out / "args.json"))["args"]["lr"] == 1e-5
    assert [r["epoch"] for r in read_log(out / "log.jsonl")] == [0, 1]
    assert not os.path.exists(partial) and not os.path.exists(out / "last.pt")


def test_stage2_stopped_in_its_second_epoch_resumes_to_the_uninterrupted_run(small, aligned, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "parts"
    sigterm_when(monkeypatch, align, "alignment_loss", lambda n: n == 2)  # in epoch 1 (1 step an epoch)
    line = stopped(capsys, align, align_args(small["teacher"], small["root"], out))
    assert f"{out}.partial/last.pt" in line and "--resume" in line
    monkeypatch.undo()
    assert torch.load(f"{out}.partial/last.pt", weights_only=True)["epoch"] == 0 and not os.path.exists(out)
    align.main(align_args(small["teacher"], small["root"], out, "--resume"))
    assert read_log(out / "log.jsonl") == read_log(aligned / "log.jsonl")
    assert [r["epoch"] for r in read_log(out / "log.jsonl")] == [0, 1]
    assert json.load(open(out / "metrics.json")) == json.load(open(aligned / "metrics.json"))
    assert student_equal(out / "student.pt", aligned / "student.pt")
    assert student_equal(out / "student_init.pt", aligned / "student_init.pt")
    assert not os.path.exists(f"{out}.partial") and not os.path.exists(out / "last.pt")


# ----------------------------------------------------------------------------- resume: refused for another run


def test_resume_is_refused_after_the_teacher_was_replaced(small, tmp_path, capsys, monkeypatch):
    """Stage 2 stopped in its 2nd epoch; then stage 1 was run again into the teacher's folder with
    other settings: a --resume would mix two teachers, and is refused in one line naming it."""
    teacher, out = tmp_path / "teacher", tmp_path / "align"
    shutil.copytree(small["teacher"], teacher)
    sigterm_when(monkeypatch, align, "alignment_loss", lambda n: n == 2)  # in epoch 1
    stopped(capsys, align, align_args(teacher, small["root"], out))
    monkeypatch.undo()
    assert os.path.isfile(f"{out}.partial/last.pt")
    kept = {k: v for k, v in tree(f"{out}.partial").items() if k in ("last.pt", "log.jsonl", "student_init.pt")}
    patch.main(patch_args(small["root"], teacher, "--epochs", "1", "--alphas", "0", "--lr", "1e-4", "--overwrite"))
    line = stopped(capsys, align, align_args(teacher, small["root"], out, "--resume"), code=2)
    assert "the teacher's weights changed" in line and "--overwrite" in line
    assert tree(f"{out}.partial").items() >= kept.items() and len(kept) == 3 and not os.path.exists(out)


def test_resume_is_refused_after_training_files_were_added(tmp_path, capsys, monkeypatch):
    root, out = small_ms(tmp_path / "ms"), tmp_path / "run"
    sigterm_when(monkeypatch, C, "check_finite", lambda n: n == 3)
    stopped(capsys, patch, patch_args(root, out))
    monkeypatch.undo()
    new = next(f"Forest/Forest_{n}" for n in range(100, 200) if hash_split([f"Forest/Forest_{n}"], 0) == ["train"])
    shutil.copy(os.path.join(root, "Forest", "Forest_1.tif"), os.path.join(root, new + ".tif"))
    before = tree(f"{out}.partial")
    line = stopped(capsys, patch, patch_args(root, out, "--resume"), code=2)
    assert "the training list changed" in line
    assert "go on with the same command" not in line  # the same command was just refused
    assert tree(f"{out}.partial") == before  # a refused resume changes nothing, args.json included


# ----------------------------------------------------------------------------- a stop anywhere: one line, exit 130


def test_a_stop_while_the_model_loads_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    root = small_ms(tmp_path / "ms")
    sigterm_when(monkeypatch, C, "zeroshot_head", lambda n: True)
    line = stopped(capsys, patch, patch_args(root, tmp_path / "run"))
    assert line == "stopped: nothing was saved"
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "run.partial")


def test_a_stop_in_the_first_epoch_keeps_nothing(tmp_path, capsys, monkeypatch):
    root = small_ms(tmp_path / "ms")
    sigterm_when(monkeypatch, C, "check_finite", lambda n: n == 2)  # the last step of epoch 0, before its checkpoint
    assert stopped(capsys, patch, patch_args(root, tmp_path / "run")) == "stopped: nothing was saved"
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "run.partial")


def test_a_stop_during_evaluation_is_one_line_and_the_same_command_works(small, tmp_path, capsys, monkeypatch):
    argv = eval_args(small["teacher"], tmp_path / "eval", tmp_path / "r.jsonl", "--root", small["root"])
    sigterm_when(monkeypatch, evaluate, "zeroshot_metrics", lambda n: True)
    line = stopped(capsys, evaluate, argv)
    assert "was not written; run the same command again" in line and str(tmp_path / "eval") in line
    monkeypatch.undo()
    assert not glob.glob(str(tmp_path / "eval*")) and not os.path.exists(tmp_path / "r.jsonl")
    evaluate.main(argv)
    assert os.path.isfile(tmp_path / "eval" / "metrics.json") and len(read_log(tmp_path / "r.jsonl")) == 1


def test_a_stop_in_the_second_data_set_names_the_first_and_its_hint_continues(small, tmp_path, capsys, monkeypatch):
    rgb = make_eurosat_rgb(tmp_path / "rgb", per_class=8, classes=["beach", "glacier", "harbor"], size=32)
    folder = os.path.join(rgb, "eurosat", "2750")
    out, results = tmp_path / "eval", tmp_path / "r.jsonl"
    argv = eval_args(small["teacher"], out, results)
    calls = sigterm_when(monkeypatch, C, "embed", lambda n: n == 2)  # once per data set: the second one
    line = stopped(capsys, evaluate, [*argv, "--data", f"eurosat_ms={small['root']}", f"folder={folder}"])
    monkeypatch.undo()
    assert calls["n"] == 2
    first = out / "eurosat_ms-test"
    assert "eurosat_ms" in line.split("finished before it:")[1].split(";")[0]
    hint = line.split("go on with ", 1)[1]
    assert f"--data folder={folder}" in hint and "eurosat_ms=" not in hint, line
    assert os.path.isfile(first / "metrics.json") and not glob.glob(str(out / "folder-test*"))
    assert [r["data"] for r in read_log(results)] == ["eurosat_ms"]
    finished = tree(first)
    evaluate.main([*argv, *shlex.split(hint)])  # the hinted command, as a user would type it
    assert tree(first) == finished
    assert [r["data"] for r in read_log(results)] == ["eurosat_ms", "folder"]
    done = [json.load(open(p)) for p in glob.glob(str(out / "**" / "metrics.json"), recursive=True)]
    assert sorted(m["data"] for m in done) == ["eurosat_ms", "folder"]


# ----------------------------------------------------------------------------- a refused or failed run changes nothing


@pytest.mark.parametrize("stage_name", ["01_patch_clip.py", "02_align_s2.py", "03_eval.py"])
def test_a_refused_run_leaves_no_run_folder(tmp_path, capsys, stage_name):
    stage = load_stage(stage_name)
    out = tmp_path / "runs" / "x"
    argv = {"01_patch_clip.py": ["--data", "eurosat_ms", "--root", str(tmp_path / "missing"), "--out", str(out)],
            "02_align_s2.py": ["--teacher", str(tmp_path / "missing"), "--out", str(out)],
            "03_eval.py": ["--ckpt", str(tmp_path / "missing"), "--out", str(out),
                           "--results", str(tmp_path / "runs" / "results.jsonl")]}[stage_name]
    line = stopped(capsys, stage, argv, code=2)
    assert "missing" in line
    assert not os.path.exists(tmp_path / "runs")


def test_stage2_into_a_stage1_folder_is_refused_and_changes_nothing(small, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(small["teacher"], teacher)
    before = tree(teacher)
    for flags in ([], ["--overwrite"]):
        line = stopped(capsys, align, align_args(teacher, small["root"], teacher, *flags), code=2)
        assert str(teacher) in line and "01_patch_clip.py" in line
        assert tree(teacher) == before and not os.path.exists(f"{teacher}.partial")


def test_a_student_file_is_evaluated_as_a_student_beside_a_patched_clip(small, aligned, tmp_path):
    """An old-style folder X holding both a patched CLIP (patched.json) and a student.pt aligned to it:
    --ckpt X/student.pt is the student, with its teacher X."""
    x = tmp_path / "x"
    shutil.copytree(small["teacher"], x)
    shutil.copy(aligned / "student.pt", x / "student.pt")
    evaluate.main(eval_args(x / "student.pt", tmp_path / "eval", tmp_path / "r.jsonl", "--root", small["root"]))
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["ckpt_kind"] == "student" and metrics["ckpt"] == str(x / "student.pt")
    assert metrics["teacher"] == str(small["teacher"]) and metrics["case"]["student_ms"] == "trained on"
    assert {"clip_rgb", "student_ms"} <= metrics["metrics"]["zeroshot"].keys()
    assert "ms_to_rgb" in metrics["metrics"]["cross_modal"]


def test_a_refused_second_evaluation_changes_neither_the_finished_one_nor_a_run_in_progress(small, tmp_path, capsys):
    out, results = tmp_path / "eval", tmp_path / "r.jsonl"
    argv = eval_args(small["teacher"], out, results, "--root", small["root"])
    evaluate.main(argv)
    os.makedirs(f"{out}.partial")  # another run into OUT in progress (as its run folder looks while it embeds)
    with open(f"{out}.partial/args.json", "w") as f:
        json.dump({"args": {"out": str(out)}, "stage": "03_eval.py"}, f)
    before, in_progress, log = tree(out), tree(f"{out}.partial"), open(results).read()
    line = stopped(capsys, evaluate, argv, code=2)
    assert str(out) in line and "--overwrite" in line
    assert tree(out) == before and tree(f"{out}.partial") == in_progress and open(results).read() == log
    # and with no finished OUT, only the run in progress: refused too, without touching it
    shutil.rmtree(out)
    line = stopped(capsys, evaluate, argv, code=2)
    assert f"{out}.partial holds an unfinished run" in line
    assert tree(f"{out}.partial") == in_progress and not os.path.exists(out) and open(results).read() == log


@pytest.mark.parametrize("failure", ["bad tif", "nan loss"])
def test_a_failed_overwrite_leaves_the_finished_student_as_it_was(small, aligned, tmp_path, capsys, monkeypatch,
                                                                 failure):
    root, out = tmp_path / "ms", tmp_path / "run"
    shutil.copytree(small["root"], root)
    shutil.copytree(aligned, out)
    before = tree(out)
    assert {"args.json", "log.jsonl", "metrics.json", "student_init.pt", "student.pt"} <= before.keys()
    if failure == "bad tif":
        bad = os.path.join(root, C.load_split("eurosat_ms", str(root), "train", 0).files[3])
        open(bad, "wb").write(open(bad, "rb").read()[:3000])
        words = [bad, "--skip-bad-files"]
    else:
        loss = align.alignment_loss

        def nan(*a, **k):
            total, mse, ce = loss(*a, **k)
            return total * float("nan"), mse, ce
        monkeypatch.setattr(align, "alignment_loss", nan)
        words = ["loss became nan at step 0", "--lr"]
    line = stopped(capsys, align, align_args(small["teacher"], root, out, "--overwrite", "--seed", "1"), code=2)
    for w in words:
        assert w in line, (w, line)
    assert tree(out) == before
    assert not os.path.exists(f"{out}.partial")  # it held no checkpoint (the failure came in epoch 0)


# ----------------------------------------------------------------------------- what is printed


def test_true_pairs_no_closer_than_random_pairs_are_warned_about():
    mean_direction = torch.ones(50, 8) + 0.1 * torch.randn(50, 8)
    gap = evaluate.modality_gap(mean_direction + 0.1 * torch.randn(50, 8), mean_direction[torch.randperm(50)])
    assert gap["true_pair_cosine"] - gap["random_pair_cosine"] < 0.05
    assert "mean direction" in evaluate.pairing_warning(gap)
    aligned = torch.randn(50, 8)
    assert evaluate.pairing_warning(evaluate.modality_gap(aligned + 0.1 * torch.randn(50, 8), aligned)) is None


def test_output_has_one_compact_start_line_and_no_progress_frames(tmp_path, capsys):
    root = small_ms(tmp_path / "ms")
    patch.main(patch_args(root, tmp_path / "run", "--epochs", "1", "--alphas", "0"))
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out  # not a terminal: no progress bars
    start = [line for line in captured.out.splitlines() if line.startswith("device ")]
    assert len(start) == 1 and "run folder" in start[0] and "args.json" in start[0]
    assert not re.search(r"^\s+lr: ", captured.out, re.M)  # no argument dump
    assert re.search(r"^epoch 0: train loss \d", captured.out, re.M)  # a per-epoch line, as stage 2 prints
    assert json.load(open(tmp_path / "run" / "args.json"))["stage"] == "01_patch_clip.py"


# ----------------------------------------------------------------------------- what a user's review found


def test_out_with_a_trailing_slash_or_as_dot_is_the_same_folder(small, tmp_path, capsys, monkeypatch):
    results = tmp_path / "r.jsonl"
    evaluate.main(eval_args(small["teacher"], f"{tmp_path / 'eval'}/", results))  # as shell completion writes it
    assert os.path.isfile(tmp_path / "eval" / "metrics.json") and not glob.glob(str(tmp_path / "eval" / "*partial*"))
    assert "already holds a finished run" in stopped(capsys, evaluate, eval_args(small["teacher"], tmp_path / "eval",
                                                                               results), code=2)
    os.makedirs(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    evaluate.main(eval_args(small["teacher"], ".", results))  # an empty current folder
    assert os.path.isfile(tmp_path / "here" / "metrics.json") and sorted(os.listdir(tmp_path)).count("here.partial") == 0


def test_overwrite_never_discards_the_folder_of_a_run_that_is_still_running(small, tmp_path, capsys):
    import subprocess
    import sys
    out = tmp_path / "a"
    os.makedirs(f"{out}.partial")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(f"{out}.partial/pid", "w") as f:
            f.write(str(alive.pid))
        before = tree(f"{out}.partial")
        line = stopped(capsys, align, align_args(small["teacher"], small["root"], out, "--overwrite"), code=2)
        assert f"in use by a running process (pid {alive.pid})" in line and tree(f"{out}.partial") == before
    finally:
        alive.kill()
        alive.wait()
    assert "holds an unfinished run (its process has ended)" in stopped(capsys, align, align_args(small["teacher"], small["root"], out), code=2)


def test_a_left_over_replaced_folder_is_never_deleted(small, tmp_path, capsys):
    out = tmp_path / "e"
    os.makedirs(f"{out}.replaced")
    with open(f"{out}.replaced/notes.txt", "w") as f:
        f.write("a finished run, or the user's own files")
    line = stopped(capsys, evaluate, eval_args(small["teacher"], out, tmp_path / "r.jsonl"), code=2)
    assert "move it back" in line and os.path.isfile(f"{out}.replaced/notes.txt") and not os.path.exists(out)


@pytest.mark.parametrize("stage_name", ["01_patch_clip.py", "02_align_s2.py", "03_eval.py"])
def test_redraw_of_a_folder_without_a_finished_run_of_that_stage_is_one_line(small, tmp_path, capsys, stage_name):
    for folder in (tmp_path / "missing", small["root"], small["teacher"] if stage_name != "01_patch_clip.py" else
                   small["base"] / "aligned_not_there"):
        line = stopped(capsys, load_stage(stage_name), ["--redraw", str(folder)], code=2)
        assert "holds no finished run of " + stage_name in line


def test_packing_a_cache_does_not_change_the_random_init(small, tmp_path):
    """Packing iterates a DataLoader, which draws a seed from torch's generator: the model must be
    seeded after it, or --cache would change a --pretrained none run's results."""
    patch.main(patch_args(small["root"], tmp_path / "plain", "--epochs", "1", "--alphas", "0"))
    patch.main(patch_args(small["root"], tmp_path / "cached", "--epochs", "1", "--alphas", "0",
                          "--cache", str(tmp_path / "cache")))
    plain, cached = (json.load(open(tmp_path / name / "metrics.json")) for name in ("plain", "cached"))
    assert plain["epochs"] == cached["epochs"] and plain["alphas"] == cached["alphas"]
