"""Run folders: a --resume continues only the run it was saved by, a stop on the very last step
loses nothing, a stop anywhere is one line and exit 130, the alpha sweep resumes where it stopped,
two runs never share a folder, and a refused run leaves no folder behind."""
import fcntl
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_CLIP, TINY_STUDENT, load_stage, make_eurosat_ms

import common as C

patch = load_stage("01_patch_clip.py")
align = load_stage("02_align_s2.py")
evaluate = load_stage("03_eval.py")


def small_ms(tmp_path):
    return make_eurosat_ms(tmp_path / "ms", per_class=8, classes=["Forest", "River", "SeaLake"], size=32)


def patch_args(root, out, *extra):
    return ["--model", TINY_CLIP, "--pretrained", "none", "--data", "eurosat_ms", "--root", str(root),
            "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--alphas", "0", "0.5", "1",
            "--out", str(out), *extra]


def stopped(capsys, stage, argv, code=130):
    """Run a stage that is expected to stop; returns its one non-empty stderr line."""
    with pytest.raises(SystemExit) as e:
        stage.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, lines
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


# ----------------------------------------------------------------------------- resume identity (issue 15.4)


def test_resume_continues_only_the_run_that_saved_last_pt(tmp_path, capsys, monkeypatch):
    root, out = small_ms(tmp_path), tmp_path / "run"
    sigterm_when(monkeypatch, C, "check_finite", lambda n: n == 2)  # run A: stopped during its 2nd step
    stopped(capsys, patch, patch_args(root, out, "--lr", "1e-3"))
    monkeypatch.undo()
    # a fresh run B may not silently discard A's last.pt ...
    line = stopped(capsys, patch, patch_args(root, out, "--lr", "1e-5"), code=2)
    assert "interrupted run" in line and "--resume" in line and "--overwrite" in line
    # ... with --overwrite it starts afresh, and a stop leaves B's own state
    sigterm_when(monkeypatch, C, "check_finite", lambda n: n == 1)
    stopped(capsys, patch, patch_args(root, out, "--lr", "1e-5", "--overwrite"))
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["settings"]["lr"] == 1e-5
    line = stopped(capsys, patch, patch_args(root, out, "--lr", "1e-3", "--resume"), code=2)  # A's flags
    assert "--lr was 1e-05" in line
    patch.main(patch_args(root, out, "--lr", "1e-5", "--resume"))
    patch.main(patch_args(root, tmp_path / "whole", "--lr", "1e-5"))
    assert json.load(open(out / "metrics.json")) == json.load(open(tmp_path / "whole" / "metrics.json"))
    assert json.load(open(out / "args.json"))["args"]["lr"] == 1e-5


# ----------------------------------------------------------------------------- a stop on the last step (15.5)


def test_stage1_stopped_on_its_last_step_resumes_to_the_same_log(tmp_path, capsys, monkeypatch):
    root = small_ms(tmp_path)
    patch.main(patch_args(root, tmp_path / "whole"))
    whole = json.load(open(tmp_path / "whole" / "metrics.json"))
    last = whole["steps"]
    assert [(r["epoch"], r["step"]) for r in whole["epochs"]] == [(0, last // 2), (1, last)]
    sigterm_when(monkeypatch, C, "check_finite", lambda n: n == last)
    line = stopped(capsys, patch, patch_args(root, tmp_path / "parts"))
    assert f"at step {last}" in line and "--resume" in line
    monkeypatch.undo()
    patch.main(patch_args(root, tmp_path / "parts", "--resume"))
    assert json.load(open(tmp_path / "parts" / "metrics.json")) == whole


def test_stage2_stopped_on_its_last_step_resumes_to_the_same_log(tmp_path, capsys, monkeypatch):
    root = small_ms(tmp_path)
    patch.main(patch_args(root, tmp_path / "patch", "--epochs", "1", "--alphas", "0"))
    argv = lambda out, *extra: ["--teacher", str(tmp_path / "patch"), "--root", str(root), *TINY_STUDENT,  # noqa
                                "--epochs", "2", "--batch-size", "8", "--workers", "0", "--out", str(out), *extra]
    align.main(argv(tmp_path / "whole"))
    whole = json.load(open(tmp_path / "whole" / "metrics.json"))["epochs"]
    last = whole[-1]["step"]
    assert [(r["epoch"], r["step"]) for r in whole] == [(0, last // 2), (1, last)]
    sigterm_when(monkeypatch, C, "check_finite", lambda n: n == last)
    assert f"at step {last}" in stopped(capsys, align, argv(tmp_path / "parts"))
    monkeypatch.undo()
    align.main(argv(tmp_path / "parts", "--resume"))
    assert json.load(open(tmp_path / "parts" / "metrics.json"))["epochs"] == whole  # the final validation too


# ----------------------------------------------------------------------------- a stop anywhere (issue 13.5)


def test_a_stop_while_the_model_loads_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    root = small_ms(tmp_path)
    sigterm_when(monkeypatch, C, "zeroshot_head", lambda n: True)
    line = stopped(capsys, patch, patch_args(root, tmp_path / "run"))
    assert line.startswith("SIGTERM: stopped; nothing was written") and "same command" in line
    assert not os.path.exists(tmp_path / "run")


def test_a_stop_in_the_alpha_sweep_resumes_without_evaluating_those_alphas_again(tmp_path, capsys, monkeypatch):
    root, out = small_ms(tmp_path), tmp_path / "run"
    calls = sigterm_when(monkeypatch, patch, "zeroshot_score", lambda n: n == 2)  # while alpha 0.5 is evaluated
    line = stopped(capsys, patch, patch_args(root, out))
    assert "last.pt" in line and "--resume" in line and calls["n"] == 2
    assert [r["alpha"] for r in C.read_jsonl(out / "alphas.jsonl")] == [0]
    monkeypatch.undo()
    calls = sigterm_when(monkeypatch, patch, "zeroshot_score", lambda n: False)
    patch.main(patch_args(root, out, "--resume"))
    assert calls["n"] == 2  # alphas 0.5 and 1 only
    assert "training had finished" in capsys.readouterr().out
    patch.main(patch_args(root, tmp_path / "whole"))
    assert json.load(open(out / "metrics.json")) == json.load(open(tmp_path / "whole" / "metrics.json"))
    assert not os.path.exists(out / "alphas.jsonl") and not os.path.exists(out / "last.pt")


def test_a_stop_during_evaluation_is_one_line(tmp_path, capsys, monkeypatch):
    root = small_ms(tmp_path)
    patch.main(patch_args(root, tmp_path / "patch", "--epochs", "1", "--alphas", "0"))
    sigterm_when(monkeypatch, evaluate, "zeroshot_metrics", lambda n: True)
    line = stopped(capsys, evaluate, ["--ckpt", str(tmp_path / "patch"), "--root", str(root), "--workers", "0",
                                      "--results", str(tmp_path / "r.jsonl")])
    assert line.startswith("SIGTERM: stopped;") and "run the same command again" in line


# ----------------------------------------------------------------------------- one run per folder (15.8, 13.6)


def test_a_run_folder_in_use_by_another_run_is_refused(tmp_path, capsys):
    root, out = small_ms(tmp_path), tmp_path / "run"
    os.makedirs(out)
    with open(out / ".lock", "a+") as held:  # another run holds the folder (a separate open file: its own lock)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345\n")
        held.flush()
        line = stopped(capsys, patch, patch_args(root, out), code=2)
    assert "in use by another run (pid 12345)" in line
    assert os.listdir(out) == [".lock"]  # nothing of the second run was written
    patch.main(patch_args(root, out, "--epochs", "1", "--alphas", "0"))  # once it has ended, the folder is free


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


# ----------------------------------------------------------------------------- what stage 3 says (13.8)


def test_true_pairs_no_closer_than_random_pairs_are_warned_about():
    mean_direction = torch.ones(50, 8) + 0.1 * torch.randn(50, 8)
    gap = evaluate.modality_gap(mean_direction + 0.1 * torch.randn(50, 8), mean_direction[torch.randperm(50)])
    assert gap["true_pair_cosine"] - gap["random_pair_cosine"] < 0.05
    assert "mean direction" in evaluate.pairing_warning(gap)
    aligned = torch.randn(50, 8)
    assert evaluate.pairing_warning(evaluate.modality_gap(aligned + 0.1 * torch.randn(50, 8), aligned)) is None


def test_output_has_one_compact_start_line_and_no_progress_frames(tmp_path, capsys):
    root = small_ms(tmp_path)
    patch.main(patch_args(root, tmp_path / "run", "--epochs", "1", "--alphas", "0"))
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out  # not a terminal: no progress bars
    start = [line for line in captured.out.splitlines() if line.startswith("device ")]
    assert len(start) == 1 and "run folder" in start[0] and "args.json" in start[0]
    assert not re.search(r"^\s+lr: ", captured.out, re.M)  # no argument dump
    assert re.search(r"^epoch 0: train loss \d", captured.out, re.M)  # a per-epoch line, as stage 2 prints


@pytest.mark.parametrize("script", ["01_patch_clip.py", "02_align_s2.py", "03_eval.py"])
def test_help_answers_before_torch_is_imported(script):
    """--help parses the flags before the heavy imports: no torch, a fraction of a second."""
    done = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--data" in done.stdout and "default" in done.stdout
    assert not re.search(r"\|\s+torch\s*$", done.stderr, re.M), "torch was imported before --help answered"


def test_output_into_a_reader_that_stops_early_does_not_stop_the_run(tmp_path):
    """`python 03_eval.py ... | head -1`: no BrokenPipeError traceback, exit 0, metrics and pictures written."""
    from conftest import make_eurosat_ms, tiny_patch_args
    root = make_eurosat_ms(tmp_path / "ms", per_class=4)
    patch.main(tiny_patch_args(root, tmp_path / "patch", "eurosat_ms", "--epochs", "1", "--no-plots"))
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "03_eval.py"), "--ckpt", str(tmp_path / "patch"),
                            "--out", str(tmp_path / "eval"), "--results", str(tmp_path / "r.jsonl"), "--workers", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run.stdout.readline()
    run.stdout.close()  # the reader goes away, as head does
    err = run.stderr.read()
    assert run.wait(timeout=300) == 0 and "Traceback" not in err, err
    assert os.path.isfile(tmp_path / "eval" / "metrics.json") and len(open(tmp_path / "r.jsonl").readlines()) == 1
