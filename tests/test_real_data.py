"""All three stages, end to end, on the 200 real EuroSAT MS tifs in ../shared/data (tiny models).

A fresh clone has no ../shared: then these tests skip and say why."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import EUROSAT_CLASSES, SAMPLE_MS, TINY_STUDENT, load_stage, split_count, tiny_patch_args

import common as C

pytestmark = pytest.mark.skipif(not os.path.isdir(SAMPLE_MS),
                                reason=f"{SAMPLE_MS} (200 real EuroSAT MS tifs) is not present")


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Stage 1 -> stage 2 -> stage 3 on the real tifs, as the README chains them."""
    base = tmp_path_factory.mktemp("real")
    patch, align, evaluate, cache = base / "patch", base / "align", base / "eval", str(base / "cache")
    load_stage("01_patch_clip.py").main(tiny_patch_args(SAMPLE_MS, patch, "eurosat_ms", "--epochs", "1",
                                                        "--batch-size", "32", "--cache", cache))
    load_stage("02_align_s2.py").main(["--teacher", str(patch), "--data", "eurosat_ms",
                                       "--root", SAMPLE_MS, *TINY_STUDENT, "--epochs", "8", "--batch-size", "32",
                                       "--lr", "1e-3", "--workers", "0", "--cache", cache, "--out", str(align)])
    load_stage("03_eval.py").main(["--ckpt", str(align / "student.pt"), "--data", "eurosat_ms", "--root", SAMPLE_MS,
                                   "--workers", "0", "--cache", cache, "--out", str(evaluate),
                                   "--results", str(base / "results.jsonl")])
    return {"patch": patch, "align": align, "eval": evaluate, "results": base / "results.jsonl"}


def test_stage2_aligns_the_student_to_the_teacher_on_real_tifs(real_runs):
    """The validation MSE to the teacher's embeddings of the RGB composites falls well below the untrained student's."""
    meta = json.load(open(real_runs["patch"] / "patched.json"))
    teacher, _, _ = C.load_teacher(str(real_runs["patch"]), "cpu")
    val = C.load_split("eurosat_ms", SAMPLE_MS, "val", meta["split_seed"])
    raw = C.ImageFiles(val)[list(range(len(val.files)))]["images"]
    assert raw.shape == (len(val.files), 64, 64, 13) and raw.dtype == torch.uint16  # as read: H, W, bands
    with torch.no_grad():
        target = teacher.encode_image(C.clip_input(raw, meta["preprocess_cfg"], "cpu", pixels=C.DATA["eurosat_ms"].pixels))
        mse = {}
        for name in ("student_init.pt", "student.pt"):
            student = load_stage("03_eval.py").load_student(str(real_runs["align"] / name))
            mse[name] = F.mse_loss(student(C.ms_input(raw, student.input_size, "cpu")), target).item()
    assert mse["student.pt"] < 0.5 * mse["student_init.pt"], mse
    epochs = json.load(open(real_runs["align"] / "metrics.json"))["epochs"]
    assert mse["student.pt"] == pytest.approx(epochs[-1]["val_mse"], rel=1e-4)


def test_stage3_writes_every_metric_for_the_real_test_split(real_runs):
    result = json.load(open(real_runs["eval"] / "metrics.json"))
    m = result["metrics"]
    assert result["n_images"] == split_count(SAMPLE_MS, "test") and result["n_classes"] == 10  # 33 of the 200
    assert result["skipped_files"] == 0
    for name in ("clip_rgb", "student_ms"):
        zs = m["zeroshot"][name]
        assert 0 <= zs["acc1"] <= zs["acc5"] <= 1 and 0 <= zs["mean_per_class_recall"] <= 1
        assert list(zs["per_class"]) == EUROSAT_CLASSES
        # mean per-class recall (balanced accuracy) is the mean of the per-class accuracies (every class has test images)
        assert zs["mean_per_class_recall"] == pytest.approx(sum(zs["per_class"].values()) / 10)
        t2i = m["text_to_image"][name]
        assert 0 < t2i["mean_average_precision"] <= 1 and 0 <= t2i["precision_at_10"] <= 1
    for direction in ("ms_to_rgb", "rgb_to_ms"):
        r = m["cross_modal"][direction]
        assert 0 <= r["recall@1"] <= r["recall@5"] <= r["recall@10"] <= 1
    gap = m["modality_gap"]
    assert set(gap) == {"before", "after"}
    assert gap["after"]["true_pair_cosine"] > gap["before"]["true_pair_cosine"]
    (row,) = [json.loads(line) for line in open(real_runs["results"])]
    assert row["case/clip_rgb"] == row["case/student_ms"] == "trained on"
    numbers = {k: v for k, v in row.items() if "/" in k and not k.startswith("case/")}
    assert len(numbers) > 40 and all(isinstance(v, float) and math.isfinite(v) for v in numbers.values()), numbers
