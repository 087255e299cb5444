"""BigEarthNet-S2 v1.0: the reader, the 19/43/5-class targets, the official splits, the packed cache,
the bands on one grid, bad input, and all three stages end to end on the 6 real patches in
../shared (skipped where absent) with generated patches in the same layout."""
import bz2
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from conftest import (BEN_BANDS, ROOT, SHARED_BEN, SHARED_BEN_SPLITS, TINY_CLIP, TINY_STUDENT, load_stage,
                      make_bigearthnet_patch, official_names)

import common as C

needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED_BEN),
                                  reason=f"{SHARED_BEN} (6 real BigEarthNet-S2 patches) is not present")
NOMENCLATURE = os.path.join(SHARED_BEN_SPLITS, "nomenclature.json")
REAL_19 = "S2B_MSIL2A_20170924T93020_69_24"
SNOW = "S2B_MSIL2A_20180204T94161_57_38"
PORT = ["Port areas"]  # a 43-class label with no 19-class counterpart


def nomenclature():
    """The facts, from ../shared where present, else the copy the project ships."""
    path = NOMENCLATURE if os.path.isfile(NOMENCLATURE) else os.path.join(C.SHIPPED, "nomenclature.json")
    return json.load(open(path))


def expected_targets(labels, n_classes):
    """0/1 targets from 43-class names through the nomenclature's maps, computed here."""
    nom = nomenclature()
    target = np.zeros(n_classes, np.uint8)
    for name in labels:
        i = nom["labels43"].index(name)
        j = i if n_classes == 43 else nom[f"map43to{n_classes}"].get(str(i))
        if j is not None:
            target[j] = 1
    return target


def generated(root, per_split=4, seed=0):
    """Patches in the real layout, named from the official lists, with real label names."""
    nom = nomenclature()
    rng = np.random.default_rng(seed)
    made = {}
    for split in ("train", "val", "test"):
        for k, name in enumerate(official_names(split, per_split)):
            labels = list(rng.choice(nom["labels43"], size=rng.integers(1, 4), replace=False))
            make_bigearthnet_patch(root, name, labels, seed=seed + k)
            made[name] = (split, labels)
    return made


# ----------------------------------------------------------------------------- the real patches


@needs_shared
def test_real_patches_bands_sizes_and_order():
    for name in sorted(os.listdir(SHARED_BEN)):
        parts = C.read_bigearthnet(os.path.join(SHARED_BEN, name))
        assert [p.shape for p in parts] == [(120, 120, 4), (60, 60, 6), (20, 20, 2)]
        assert all(p.dtype == np.uint16 for p in parts)
        for group, part in zip(C.BIGEARTHNET_BANDS, parts):
            for k, band in enumerate(group):  # each channel is the tif of that band, read here with tifffile
                expected = tifffile.imread(os.path.join(SHARED_BEN, name, f"{name}_{band}.tif"))
                assert expected.shape[0] == BEN_BANDS[band] and np.array_equal(part[..., k], expected), (name, band)
        assert 50 < parts[0][..., 2].mean() < 10000  # B04: L2A surface reflectance x 10,000


@needs_shared
def test_real_targets_splits_and_the_snow_patch():
    scenes = C.list_scenes("bigearthnet19", SHARED_BEN)
    row = scenes.labels[scenes.files.index(REAL_19)]
    assert [c for c, y in zip(scenes.classes, row) if y] == [
        "Coniferous forest", "Mixed forest", "Transitional woodland, shrub", "Inland wetlands", "Inland waters"]
    with bz2.open(os.path.join(SHARED_BEN_SPLITS, "patches_with_seasonal_snow.csv.bz2"), "rt") as f:
        assert SNOW in f.read().split()
    assert SNOW not in scenes.files and sum(scenes.left_out.values()) == 1  # on the snow list, left out, counted
    official = {}
    for split in ("train", "val", "test"):
        with bz2.open(os.path.join(SHARED_BEN_SPLITS, f"{split}.csv.bz2"), "rt") as f:
            official.update((n, split) for n in f.read().split())
    assert dict(zip(scenes.files, scenes.official_split)) == {n: official[n] for n in scenes.files}
    assert sorted(scenes.official_split) == ["test", "train", "train", "train", "train"]
    for n_classes in (19, 43, 5):
        s = C.list_scenes(f"bigearthnet{n_classes}", SHARED_BEN)
        for name, row in zip(s.files, s.labels):
            labels = json.load(open(os.path.join(SHARED_BEN, name, f"{name}_labels_metadata.json")))["labels"]
            assert np.array_equal(row, expected_targets(labels, n_classes)), (n_classes, name)


# ----------------------------------------------------------------------------- generated patches


def test_generated_counts_splits_and_left_out_patches(tmp_path):
    root = tmp_path / "BigEarthNet-v1.0"
    made = generated(root)
    port = official_names("train", 5)[-1]
    make_bigearthnet_patch(root, port, PORT)
    make_bigearthnet_patch(root, "S2A_MSIL2A_20990101T000000_0_0", ["Pastures"])  # on no official list
    for n_classes in (19, 43, 5):
        scenes = C.list_scenes(f"bigearthnet{n_classes}", str(tmp_path))  # the folder holding BigEarthNet-v1.0/
        kept = {n: v for n, v in {**made, port: ("train", PORT)}.items() if expected_targets(v[1], n_classes).any()}
        assert port in kept or n_classes == 19
        assert sorted(scenes.files) == sorted(kept) and scenes.root == str(root)
        assert sum(scenes.left_out.values()) == len(made) + 2 - len(kept)  # + the unlisted patch
        for split in ("train", "val", "test"):
            part = C.load_split(f"bigearthnet{n_classes}", str(root), split, seed=7)  # the seed plays no part
            assert sorted(part.files) == sorted(n for n, (s, _) in kept.items() if s == split)
            for name, row in zip(part.files, part.labels):
                assert np.array_equal(row, expected_targets(kept[name][1], n_classes))
    assert "no label among the 19 classes" in C.left_out_note(C.list_scenes("bigearthnet19", str(root)))


def test_packed_cache_equals_the_tifs_and_stores_each_band_at_its_resolution(tmp_path):
    generated(tmp_path, per_split=6)
    train = C.load_split("bigearthnet43", str(tmp_path), "train", 0)
    files, packed = C.open_images(train), C.open_images(train, cache=str(tmp_path / "cache"))
    assert isinstance(packed, C.PackedImages) and [p.shape[1:] for p in packed.parts] == [
        (120, 120, 4), (60, 60, 6), (20, 20, 2)]
    assert sum(p[0].nbytes for p in packed.parts) == 160_000  # bytes a patch, as the 12 tifs' pixels
    for kw in ({}, {"train": True, "seed": 1}):
        for a, b in zip(C.batch_loader(packed, 4, **kw), C.batch_loader(files, 4, **kw)):
            assert all(torch.equal(x, y) for x, y in zip(a["images"], b["images"]))
            assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["index"], b["index"])
            assert a["labels"].shape[1] == 43


def test_bands_on_one_grid_in_the_students_order():
    rng = np.random.default_rng(0)
    parts = tuple(torch.from_numpy(rng.integers(0, 10000, (2, s, s, len(b))).astype(np.uint16))
                  for s, b in zip(C.BIGEARTHNET_SIZES, C.BIGEARTHNET_BANDS))
    pixels = C.DATA["bigearthnet19"].pixels
    x = C.s2_bands(parts, pixels, "cpu")
    assert x.shape == (2, 13, 120, 120)
    assert torch.all(x[:, C.S2_BANDS.index("B10")] == 0)  # absent from L2A: zeros, as the official code
    for group, part in zip(C.BIGEARTHNET_BANDS, parts):
        for k, band in enumerate(group):  # torchvision's bilinear resize of each band alone, as the reference
            ref = torch.nn.functional.interpolate(part[..., k][:, None].float(), size=(120, 120), mode="bilinear")
            assert torch.allclose(x[:, C.S2_BANDS.index(band)], ref[:, 0]), band
    assert torch.equal(x[:, C.S2_BANDS.index("B02")], parts[0][..., 0].float())  # 10 m bands unchanged
    flat = tuple(torch.full_like(p, 1234) for p in parts)  # a constant stays constant (no edge effects)
    assert torch.all(C.s2_bands(flat, pixels, "cpu")[:, [i for i, b in enumerate(C.S2_BANDS) if b != "B10"]] == 1234)
    # the student's input: reflectance DN / 10000 in [0, 1]; CLIP's: B04, B03, B02 x 255/2000
    ms = C.ms_input(parts, 32, "cpu", pixels=pixels)
    assert ms.shape == (2, 13, 32, 32) and 0 <= ms.min() and ms.max() <= 1
    rgb = C.rgb_composite(x, pixels.rgb_max)
    expected = np.floor(np.clip(x[:, [3, 2, 1]].numpy().astype(np.float64) * 255 / 2000, 0, 255))
    assert np.array_equal(rgb.numpy(), expected)


# ----------------------------------------------------------------------------- bad input


def test_bad_patches_are_named_and_skippable(tmp_path):
    made = generated(tmp_path, per_split=5)
    train = sorted(n for n, (s, _) in made.items() if s == "train")
    os.remove(tmp_path / train[1] / f"{train[1]}_B8A.tif")
    tifffile.imwrite(tmp_path / train[2] / f"{train[2]}_B05.tif", np.zeros((120, 120), np.uint16))
    json.dump({"labels": ["Pastures", "Lunar regolith"]}, open(tmp_path / train[3] / f"{train[3]}_labels_metadata.json", "w"))
    b04 = tmp_path / train[4] / f"{train[4]}_B04.tif"  # a truncated band is named by its file, not its patch
    b04.write_bytes(b04.read_bytes()[:3000])
    scenes = C.load_split("bigearthnet19", str(tmp_path), "train", 0)
    batch = C.open_images(scenes)[list(range(len(scenes.files)))]
    reasons = dict(batch["bad"])
    assert len(reasons) == 4 and batch["index"].tolist() == [0]
    assert str(b04) in reasons[str(tmp_path / train[4])] and "cannot read GeoTIFF" in reasons[str(tmp_path / train[4])]
    assert "B8A" in reasons[str(tmp_path / train[1])] and "does not exist" in reasons[str(tmp_path / train[1])]
    assert "(60, 60)" in reasons[str(tmp_path / train[2])] and f"{train[2]}_B05.tif" in reasons[str(tmp_path / train[2])]
    assert "Lunar regolith" in reasons[str(tmp_path / train[3])] and "labels_metadata.json" in reasons[str(tmp_path / train[3])]
    with pytest.raises(C.UserError, match=f"{train[1]}.*B8A.*--skip-bad-files"):
        list(C.batch_loader(C.open_images(scenes), 2))  # the first bad file stops the run, named
    skipping = C.open_images(scenes, skip_bad_files=True)
    batches = list(C.batch_loader(skipping, 2))  # [0, 1], [2, 3] (both bad: no batch), [4] (bad)
    assert [b["index"].tolist() for b in batches] == [[0]] and all("bad" not in b for b in batches)
    assert skipping.skipped == reasons


def test_bigearthnet_v2_and_empty_roots_are_refused(tmp_path):
    v2 = tmp_path / "reBEN"
    (v2 / "BigEarthNet-S2" / "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP").mkdir(parents=True)
    (v2 / "metadata.parquet").write_bytes(b"PAR1")
    with pytest.raises(C.UserError, match="v2.0"):
        C.list_scenes("bigearthnet19", str(v2))
    with pytest.raises(C.UserError, match="does not exist"):
        C.list_scenes("bigearthnet19", str(tmp_path / "nowhere"))
    (tmp_path / "other" / "some_folder").mkdir(parents=True)
    with pytest.raises(C.UserError, match="no BigEarthNet-S2 v1.0 patch folders"):
        C.list_scenes("bigearthnet19", str(tmp_path / "other"))


# ----------------------------------------------------------------------------- the stages


def ap_by_hand(scores, targets):
    """Mean over classes with positives of the mean precision at each positive's rank (no ties)."""
    aps = []
    for c in range(targets.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")
        hits = targets[order, c]
        if hits.sum():
            aps.append(np.mean((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits == 1]))
    return float(np.mean(aps))


def test_multilabel_patching_loss_is_smoothed_binary_cross_entropy():
    stage = load_stage("01_patch_clip.py")
    g = torch.Generator().manual_seed(0)  # unseeded, 1 draw in 18 put 0.2's loss within 0.1% of 0's
    logits, labels = torch.randn(5, 19, generator=g), (torch.rand(5, 19, generator=g) < 0.3).long()
    for eps in (0.0, 0.2):
        t = labels.double() * (1 - eps) + eps / 2
        p = torch.sigmoid(logits.double())
        expected = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
        assert stage.patching_loss(logits, labels, eps).item() == pytest.approx(expected.item(), rel=1e-5)
    # the official BigEarthNet config's BinaryCrossEntropy(smoothing=0.2) has no smooth_dense: 0/1 targets, 0 here
    from timm.loss import BinaryCrossEntropy
    official = BinaryCrossEntropy(smoothing=0.2)(logits, labels.float()).item()
    assert stage.patching_loss(logits, labels, 0.0).item() == pytest.approx(official, rel=1e-6)
    assert stage.patching_loss(logits, labels, 0.2).item() != pytest.approx(official, rel=1e-3)
    assert stage.patching_loss(logits, labels[:, 0] * 3, 0.1).item() == pytest.approx(
        F.cross_entropy(logits, labels[:, 0] * 3, label_smoothing=0.1).item())  # one class per image: CE


@pytest.fixture(scope="module")
def ben_runs(tmp_path_factory):
    """Stages 1 -> 2 -> 3 on BigEarthNet-19: the real patches where present, plus generated ones."""
    base = tmp_path_factory.mktemp("ben")
    root = base / "BigEarthNet-v1.0"
    generated(root, per_split=6)
    real = os.path.isdir(SHARED_BEN)
    for name in sorted(os.listdir(SHARED_BEN)) if real else ():
        shutil.copytree(os.path.join(SHARED_BEN, name), root / name)
    patch, align, evaluate = base / "patch", base / "align", base / "eval"
    common = ["--data", "bigearthnet19", "--root", str(base), "--workers", "0", "--batch-size", "8"]
    load_stage("01_patch_clip.py").main([*common, "--model", TINY_CLIP, "--pretrained", "none", "--epochs", "2",
                                         "--lr", "1e-3", "--alphas", "0", "0.5", "1", "--label-smoothing", "0.2",
                                         "--out", str(patch)])
    load_stage("02_align_s2.py").main([*common, "--teacher", str(patch), *TINY_STUDENT,
                                       "--epochs", "2", "--lr", "1e-3", "--out", str(align)])
    load_stage("03_eval.py").main([*common, "--ckpt", str(align / "student.pt"), "--out", str(evaluate),
                                   "--results", str(base / "results.jsonl"), "--save-embeddings"])
    return {"root": root, "patch": patch, "align": align, "eval": evaluate, "real": real}


def test_stages_end_to_end_on_bigearthnet(ben_runs):
    meta = json.load(open(ben_runs["patch"] / "patched.json"))
    assert meta["dataset"] == "bigearthnet19" and len(meta["classes"]) == 19
    assert meta["classnames"][13] == "transitional woodland, shrub"
    trained = open(ben_runs["patch"] / "train_scenes.txt").read().split()
    assert trained == sorted(C.load_split("bigearthnet19", str(ben_runs["root"]), "train", 0).files)
    if ben_runs["real"]:
        assert REAL_19 in trained and SNOW not in trained
    rows = json.load(open(ben_runs["patch"] / "metrics.json"))["alphas"]
    assert [sorted(r) for r in rows] == [["alpha", "task_map"]] * 3  # the alpha sweep scores mAP
    assert json.load(open(ben_runs["align"] / "metrics.json"))["epochs"][-1]["val_map"] >= 0
    result = json.load(open(ben_runs["eval"] / "metrics.json"))
    test = C.load_split("bigearthnet19", str(ben_runs["root"]), "test", 0)
    assert result["n_images"] == len(test.files) and result["n_classes"] == 19
    saved = torch.load(ben_runs["eval"] / "embeddings.pt", weights_only=True)
    targets = saved["labels"].numpy()
    assert np.array_equal(targets, test.labels[saved["index"].numpy()])
    m = result["metrics"]
    for name in ("clip_rgb", "student_ms"):
        zs = m["zeroshot"][name]
        assert zs["mean_average_precision"] == pytest.approx(ap_by_hand(saved["logits"][name].numpy(), targets))
        assert set(zs["per_class_ap"]) == set(meta["classes"])
        # on multi-label data the text -> image mAP is the zero-shot mAP: per class, the same scores rank the images
        assert m["text_to_image"][name]["mean_average_precision"] == pytest.approx(zs["mean_average_precision"])
    assert result["classes"] == meta["classes"]  # the official order, for per_class_ap.png as for the printed table
    assert set(m["cross_modal"]) == {"ms_to_rgb", "rgb_to_ms"} and "after" in m["modality_gap"]


def test_the_benchmark_script_still_runs_on_generated_patches():
    """tests/benchmark.py is a script that prints figures, not a timed test; this only checks that
    it runs (its BigEarthNet mode makes its own patches) and prints both loader figures."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "benchmark.py"), "--bigearthnet", "40",
                           "--repeat", "1", "--loader-only", "--batch-size", "8", "--workers", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "40 patches in" in done.stdout and "images/s from the packed cache" in done.stdout


def test_the_sample_maker_writes_patches_the_stages_read(tmp_path):
    """data/make_bigearthnet_sample.py: the real sample (when present) plus generated patches on each
    official split, in the real layout, so that stages 1-2 find train and val splits."""
    import subprocess
    import sys
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_bigearthnet_sample.py"), "--out", str(tmp_path),
                    "--per-split", "2", "--real", SHARED_BEN], check=True, capture_output=True)
    scenes = C.list_scenes("bigearthnet19", str(tmp_path))
    real = 5 if os.path.isdir(SHARED_BEN) else 0  # the snow patch is left out
    assert len(scenes.files) == 6 + real and scenes.official_split.count("val") == 2
    train = C.load_split("bigearthnet19", str(tmp_path), "train", 0)
    batch = next(C.batch_loader(C.open_images(train), 8))
    assert [tuple(p.shape[1:]) for p in batch["images"]] == [(120, 120, 4), (60, 60, 6), (20, 20, 2)]
