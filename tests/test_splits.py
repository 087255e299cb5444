"""Splits depend on the scene and the seed alone, and the stages check, not assume, that held-out
scenes were not trained on."""
import json
import os
import shutil

import pytest
import torch
from conftest import SAMPLE_MS, TINY_STUDENT, load_stage, make_eurosat_ms

import common as C


def splits_by_id(root, seed=0):
    scenes = C.list_scenes("eurosat_ms", root)
    return {C.scene_id(scenes.files[i]): k for k, idx in C.split_indices(scenes, seed).items() for i in idx}


@pytest.mark.parametrize("source", ["real tifs", "generated tifs"])
def test_removing_one_file_moves_no_other_scene(tmp_path, source):
    """The review's experiment: with one AnnualCrop tif removed, 31 of 40 test scenes had been
    training scenes. Now no scene but the removed one changes its split."""
    if source == "real tifs":
        if not os.path.isdir(SAMPLE_MS):
            pytest.skip(f"{SAMPLE_MS} (200 real EuroSAT MS tifs) is not present")
        root = shutil.copytree(SAMPLE_MS, tmp_path / "ms")
    else:
        root = make_eurosat_ms(tmp_path / "ms", per_class=20, size=8)
    before = splits_by_id(root)
    os.remove(os.path.join(root, "AnnualCrop", "AnnualCrop_1.tif"))
    after = splits_by_id(root)
    assert set(before) - set(after) == {"AnnualCrop/AnnualCrop_1"}
    moved = {i: (before[i], after[i]) for i in after if before[i] != after[i]}
    assert moved == {}
    test_now_train = [i for i in after if before[i] == "test" and after[i] == "train"]
    assert test_now_train == [] and list(after.values()).count("test") > 0
    # and a file added elsewhere moves nothing either
    shutil.copy(os.path.join(root, "Forest", "Forest_2.tif"), os.path.join(root, "Forest", "Forest_999.tif"))
    again = splits_by_id(root)
    assert all(again[i] == after[i] for i in after)


def test_stages_refuse_held_out_scenes_that_were_trained_on(patched_run, tmp_path, capsys):
    """A patched.json whose split seed was changed after training: its test split now holds scenes of
    the recorded training scenes, and stages 2 and 3 refuse in one line."""
    out = tmp_path / "patch"
    shutil.copytree(patched_run["out"], out)
    trained = set(open(out / "train_scenes.txt").read().split())
    assert trained == {C.scene_id(f) for f in C.load_split("eurosat_ms", patched_run["root"], "train", 0).files}
    meta = json.load(open(out / "patched.json"))
    meta["split_seed"] = 1
    json.dump(meta, open(out / "patched.json", "w"))
    flags = ["--data", "eurosat_ms", "--root", patched_run["root"], "--workers", "0"]
    with pytest.raises(SystemExit) as e:
        load_stage("03_eval.py").main(["--ckpt", str(out), *flags, "--out", str(tmp_path / "eval"),
                                       "--results", str(tmp_path / "results.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("error: ") and "were training scenes of" in err
    assert str(out) in err and not os.path.exists(tmp_path / "eval")
    with pytest.raises(SystemExit) as e:
        load_stage("02_align_s2.py").main(["--teacher", str(out), *flags, *TINY_STUDENT,
                                           "--out", str(tmp_path / "align")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "val scenes" in err and "were training scenes of" in err
    # a changed train_scenes.txt is noticed too
    with open(out / "train_scenes.txt", "a") as f:
        f.write("Forest/Forest_1\n")
    with pytest.raises(C.UserError, match="differs from the training scenes"):
        C.read_scenes(str(out / "train_scenes.txt"), meta["train_scenes_sha256"])


def test_student_records_its_training_scenes(patched_run, tmp_path):
    out = tmp_path / "align"
    load_stage("02_align_s2.py").main(["--teacher", patched_run["ckpt"], "--data", "eurosat_ms", "--root",
                                       patched_run["root"], *TINY_STUDENT, "--epochs", "1", "--max-steps", "1",
                                       "--batch-size", "16", "--workers", "0", "--no-plots", "--out", str(out)])
    record = torch.load(out / "student.pt", map_location="cpu", weights_only=True)
    assert record["kind"] == "rsclip-align/student"
    train = C.load_split("eurosat_ms", patched_run["root"], "train", 0)
    assert record["train_scenes"] == sorted(C.scene_id(f) for f in train.files)
