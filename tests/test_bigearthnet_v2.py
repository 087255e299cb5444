"""BigEarthNet v2.0 (reBEN): the 19- and 5-class readers against an independent reading of the release
(pyarrow + tifffile here; torchgeo's BigEarthNetV2 where installed), the excluded patches, the Sentinel-1
pairs (s1_name, with its `_00_00` / `_0_0` quirk), all three stages on the 24 real pairs in ../shared
(generated patches of their names where absent), the cross-version rule of stage 3, and an LZW tif."""
import json
import os
import shutil

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
from conftest import BEN_BANDS, ROOT, TINY_CLIP, TINY_STUDENT, load_stage, make_bigearthnet_patch

import common as C

SHARED_V2 = os.path.join(ROOT, "..", "shared", "data", "bigearthnet_v2_sample")
EXCLUDED = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
needs_v2 = pytest.mark.skipif(not os.path.isdir(SHARED_V2),
                              reason=f"{SHARED_V2} (24 real BigEarthNet v2.0 pairs) is not present")
NAMES19 = ["Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
           "Complex cultivation patterns",
           "Land principally occupied by agriculture, with significant areas of natural vegetation",
           "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
           "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
           "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
           "Inland waters", "Marine waters"]  # the release's 19 names in BigEarthNet-19's order
# CORINE level 1 of each of the 19 (CLC codes 1xx artificial, 2xx agricultural, 3xx forest and semi-natural,
# 4xx wetlands, 5xx water), written here from the CLC codes, not from the project's nomenclature.json
LEVEL1 = [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4]
QUIRK = ("S2A_MSIL2A_20171101T094131_N9999_R036_T35VNJ_00_00", "S1B_IW_GRDH_1SDV_20171101T154016_35VNJ_0_0")


def s2_folder(root, patch):
    return os.path.join(root, "BigEarthNet-S2", patch.rsplit("_", 2)[0], patch)


def s1_folder(root, name):
    return os.path.join(root, "BigEarthNet-S1", name.rsplit("_", 3)[0], name)


def release_rows(root, name="metadata.parquet"):
    """The release's parquet read here with pyarrow alone: patch_id -> row."""
    return {r["patch_id"]: r for r in pq.read_table(os.path.join(root, name)).to_pylist()}


def make_v2(root, rows, excluded=(), seed=0):
    """Patches in the release's layout: S2 band tifs (uint16, each at its own size) and S1 VV, VH (float32 dB)
    under their folders, metadata.parquet listing `rows`, the second parquet listing `excluded`."""
    rng = np.random.default_rng(seed)
    for r in [*rows, *excluded]:
        folder = s2_folder(root, r["patch_id"])
        os.makedirs(folder)
        for band, size in BEN_BANDS.items():
            tifffile.imwrite(os.path.join(folder, f"{r['patch_id']}_{band}.tif"),
                             rng.integers(0, 4000, (size, size)).astype(np.uint16))
        folder = s1_folder(root, r["s1_name"])
        os.makedirs(folder)
        for band, mean in (("VV", -12.0), ("VH", -19.0)):
            tifffile.imwrite(os.path.join(folder, f"{r['s1_name']}_{band}.tif"),
                             (mean + 3 * rng.standard_normal((120, 120))).astype(np.float32))
    for name, part, flag in (("metadata.parquet", rows, False), (EXCLUDED, excluded, True)):
        table = [{"country": "Austria", "contains_seasonal_snow": flag, "contains_cloud_or_shadow": False, **r}
                 for r in part]
        pq.write_table(pa.Table.from_pylist(table), os.path.join(root, name))
    return str(root)


def row(k, split, labels):
    """A metadata.parquet row of the sample's tile; k: the patch's row and column, as 37_88 (or k_k)."""
    k = k if isinstance(k, str) else f"{k}_{k}"
    return {"patch_id": f"S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_{k}", "labels": labels, "split": split,
            "s1_name": f"S1B_IW_GRDH_1SDV_20170612T165809_33UUP_{k}", "s2v1_name": f"S2A_MSIL2A_20170613T101031_{k}"}


# the sample's 18 listed patches: where ../shared is absent, generated patches of these names stand in for them
SAMPLE = {"train": "37_88 37_89 37_90 38_88 38_89 38_90", "validation": "33_69 33_70 34_69 34_70 34_71 35_69",
          "test": "26_57 27_55 27_56 27_57 27_58 27_59"}


def expected_target(labels, n_classes=19):
    target = np.zeros(n_classes, np.uint8)
    for name in labels:
        target[NAMES19.index(name) if n_classes == 19 else LEVEL1[NAMES19.index(name)]] = 1
    return target


def read_split(dataset, root, split):
    scenes = C.load_split(dataset, str(root), split, 0)
    batch = C.open_images(scenes)[list(range(len(scenes.files)))]
    assert not batch["bad"]
    return scenes, batch


# ----------------------------------------------------------------------------- the real sample


@needs_v2
def test_sample_splits_targets_and_pixels_are_the_releases():
    rows = release_rows(SHARED_V2)
    excluded = release_rows(SHARED_V2, EXCLUDED)
    assert len(rows) == 18 and len(excluded) == 6 and not set(rows) & set(excluded)
    listed = []
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        scenes, batch = read_split("bigearthnet19_v2", SHARED_V2, split)
        patches = [os.path.basename(f) for f in scenes.files]
        assert sorted(patches) == sorted(p for p, r in rows.items() if r["split"] == name) and len(patches) == 6
        assert scenes.classes == NAMES19 and scenes.classnames[0] == "urban fabric"
        assert scenes.aliases == [rows[p]["s2v1_name"] for p in patches]
        for i, patch in enumerate(patches):
            assert np.array_equal(batch["labels"][i].numpy(), expected_target(rows[patch]["labels"]))
            for group, part in zip(C.BIGEARTHNET_BANDS, batch["images"]):
                for k, band in enumerate(group):  # each channel is its band's tif, read here with tifffile
                    tif = tifffile.imread(os.path.join(s2_folder(SHARED_V2, patch), f"{patch}_{band}.tif"))
                    assert tif.shape == (BEN_BANDS[band],) * 2 and np.array_equal(part[i, ..., k].numpy(), tif)
        listed += patches
    assert len(listed) == 18 and not set(listed) & set(excluded)  # the excluded patches' tifs are there, unread
    assert all(os.path.isdir(s2_folder(SHARED_V2, p)) for p in excluded)


@needs_v2
def test_torchgeo_reads_the_sample_as_this_project_does(tmp_path):
    """torchgeo's BigEarthNetV2 (an independent reader of the release; not a requirement): the same patches in
    each split, the same targets, the same 10 m pixels (it resamples the others with rasterio) and S1 bands."""
    pytest.importorskip("torchgeo", reason="torchgeo is not installed (optional: only this comparison)")
    from torchgeo.datasets import BigEarthNetV2
    for name in ("metadata.parquet", "BigEarthNet-S2", "BigEarthNet-S1"):
        os.symlink(os.path.abspath(os.path.join(SHARED_V2, name)), tmp_path / name)
    (tmp_path / "Reference_Maps").mkdir()  # torchgeo's check wants the pixel maps, which the sample lacks
    for split in ("train", "val", "test"):
        theirs = BigEarthNetV2(str(tmp_path), split=split, bands="s2")
        ours, batch = read_split("bigearthnet19_v2_s1", tmp_path, split)
        order = [os.path.basename(f.split("#")[0]) for f in ours.files]
        assert sorted(order) == sorted(theirs.metadata_df["patch_id"]) and len(order) == 6
        for j, patch in enumerate(theirs.metadata_df["patch_id"]):
            i = order.index(patch)
            assert torch.equal(batch["labels"][i].long(), theirs._load_target(j))
            s2, s1 = theirs._load_image(j, "s2"), theirs._load_image(j, "s1")  # B01, B02, ..., B08, B8A, ...
            assert torch.equal(s2[[1, 2, 3, 7]].permute(1, 2, 0), batch["images"][0][i].float())  # the 10 m
            vh_vv = batch["images"][3][i].permute(2, 0, 1)[[1, 0]]  # theirs: VH, VV (file names sorted) ...
            assert torch.equal(s1, vh_vv.sign() * (vh_vv.abs() + 0.5).floor())  # ... as int32, GDAL's rounding


# ----------------------------------------------------------------------------- generated patches


def test_five_classes_are_level_1_of_the_nineteen_and_the_excluded_file_is_never_opened(tmp_path):
    rng = np.random.default_rng(1)
    rows = [row(k, split, sorted(rng.choice(NAMES19, size=rng.integers(1, 5), replace=False).tolist()))
            for k, split in enumerate(["train"] * 4 + ["validation"] * 3 + ["test"] * 3)]
    rows.append(row(20, "test", NAMES19))  # every name once
    snow = [row(30, "train", ["Pastures"]), row(31, "test", ["Arable land"])]
    root = make_v2(tmp_path / "reben", rows, excluded=snow)
    (tmp_path / "reben" / EXCLUDED).write_bytes(b"not a parquet file")  # it is never read: listing still works
    for n_classes in (19, 5):
        scenes = C.list_scenes(f"bigearthnet{n_classes}_v2", root)
        assert len(scenes.classes) == n_classes and len(scenes.files) == len(rows)
        assert not {os.path.basename(f) for f in scenes.files} & {r["patch_id"] for r in snow}
        for r, target in zip(rows, scenes.labels):
            assert np.array_equal(target, expected_target(r["labels"], n_classes)), r["labels"]
    assert C.list_scenes("bigearthnet5_v2", root).classes == [
        "Artificial surfaces", "Agricultural areas", "Forest and semi-natural areas", "Wetlands", "Water bodies"]
    assert sorted(C.list_scenes("bigearthnet5_v2", root).official_split) == ["test"] * 4 + ["train"] * 4 + ["val"] * 3


def test_sentinel1_pairs_follow_s1_name_and_a_missing_partner_names_both(tmp_path):
    rows = [row(1, "train", ["Pastures"]), row(2, "test", ["Mixed forest"]),
            {**row(3, "test", ["Inland waters"]), "patch_id": QUIRK[0], "s1_name": QUIRK[1]}]
    root = make_v2(tmp_path / "reben", rows)
    if os.path.isdir(SHARED_V2):  # the real quirk pair (the release lists it as excluded): its pixels instead
        for folder in (s2_folder, s1_folder):
            name = QUIRK[folder is s1_folder]
            shutil.rmtree(folder(root, name))
            shutil.copytree(folder(SHARED_V2, name), folder(root, name))
    test, batch = read_split("bigearthnet19_v2_s1", root, "test")
    assert test.pixels.sar == {"VV": (-12.620, 5.116), "VH": (-19.290, 5.464)}  # v1.0's statistics
    i = [f.split("#") for f in test.files].index([os.path.relpath(s2_folder(root, QUIRK[0]), root), QUIRK[1]])
    *s2, sar = batch["images"]
    for k, band in enumerate(("VV", "VH")):  # the `_0_0` partner's tifs, not a `_00_00` folder
        assert not os.path.exists(s1_folder(root, QUIRK[0]))
        stored = tifffile.imread(os.path.join(s1_folder(root, QUIRK[1]), f"{QUIRK[1]}_{band}.tif"))
        assert torch.equal(sar[i, ..., k], torch.from_numpy(stored))
    b04 = tifffile.imread(os.path.join(s2_folder(root, QUIRK[0]), f"{QUIRK[0]}_B04.tif"))
    assert np.array_equal(s2[0][i, ..., 2].numpy(), b04)  # the teacher's S2 partner
    x = C.ms_input(batch["images"], 120, "cpu", test.pixels)  # the student's input: dB z-scored
    np.testing.assert_allclose(x[:, 1].numpy(), (sar[..., 1].numpy() + 19.290) / 5.464, rtol=1e-5, atol=1e-5)
    shutil.rmtree(s1_folder(root, rows[1]["s1_name"]))
    with pytest.raises(C.UserError, match=f"{rows[1]['patch_id']}.*no Sentinel-1 partner: {rows[1]['s1_name']}"):
        list(C.batch_loader(C.open_images(test), 8))


def test_bad_roots_and_a_missing_pyarrow_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(C.UserError, match="metadata.parquet does not exist.*bigearthnet19\\)"):
        C.list_scenes("bigearthnet19_v2", str(tmp_path))
    root = make_v2(tmp_path / "reben", [row(1, "train", ["Pastures", "Lunar regolith"])])
    with pytest.raises(C.UserError, match="Lunar regolith"):
        C.list_scenes("bigearthnet19_v2", root)
    with pytest.raises(C.UserError, match="v2.0.*--data bigearthnet19_v2"):
        C.list_scenes("bigearthnet19", root)  # the v1.0 reader points to the v2.0 names
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(C.UserError, match="pip install pyarrow"):
        C.list_scenes("bigearthnet19_v2", root)


def test_an_lzw_compressed_tif_reads(tmp_path):
    """Some BigEarthNet tifs and many users' are LZW-compressed: tifffile decodes them with imagecodecs."""
    image = np.random.default_rng(0).integers(0, 10000, (64, 64, 13)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "lzw.tif", image, compression="lzw", photometric="minisblack")
    assert tifffile.TiffFile(tmp_path / "lzw.tif").pages[0].compression == 5  # LZW
    assert np.array_equal(C.read_s2_tif(str(tmp_path / "lzw.tif")), image)


def test_the_benchmark_script_runs():
    """tests/benchmark_bigearthnet_v2.py prints figures (docs/performance.md); this only checks that it runs."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "benchmark_bigearthnet_v2.py"), "--rows", "2000",
                           "--patches", "8", "--repeat", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "listing 2,000 rows" in done.stdout and "8 patches, 12 tifs each: loader" in done.stdout


# ----------------------------------------------------------------------------- the stages, and across versions


@pytest.fixture(scope="module")
def v2_runs(tmp_path_factory, tiny_clip_config):
    """Stages 1 -> 2 (an S2 and an S1 student) on the real sample (where absent, generated patches of its
    names); a CLIP patched on v1.0 patches named by their v1.0 names (generated pixels: the official lists
    decide their v1.0 split)."""
    base = tmp_path_factory.mktemp("v2")
    root = SHARED_V2 if os.path.isdir(SHARED_V2) else make_v2(base / "reben", [
        row(k, split, ["Pastures", "Mixed forest"][:1 + i % 2]) for split, ks in SAMPLE.items()
        for i, k in enumerate(ks.split())])
    runs = {k: base / k for k in ("patch", "align", "align_s1", "v1_patch")}
    flags = ["--workers", "0", "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--root", root]
    clip = ["--model", TINY_CLIP, "--pretrained", "none", "--alphas", "0", "1"]
    load_stage("01_patch_clip.py").main([*flags, *clip, "--data", "bigearthnet19_v2", "--out", str(runs["patch"])])
    for data, out in (("bigearthnet19_v2", "align"), ("bigearthnet19_v2_s1", "align_s1")):
        load_stage("02_align_s2.py").main([*flags, "--data", data, "--teacher", str(runs["patch"]), *TINY_STUDENT,
                                           "--out", str(runs[out])])
    v1 = base / "BigEarthNet-v1.0"
    for k, r in enumerate(release_rows(root).values()):
        make_bigearthnet_patch(v1, r["s2v1_name"], ["Pastures", "Mixed forest"], seed=k)
    load_stage("01_patch_clip.py").main([*flags[:-1], str(v1), *clip, "--data", "bigearthnet19",
                                         "--out", str(runs["v1_patch"])])
    return {"root": root, "v1": str(v1), "base": base, **{k: str(v) for k, v in runs.items()}}


def evaluate(runs, name, *flags):
    out = os.path.join(runs["base"], f"eval-{name}")
    load_stage("03_eval.py").main([*flags, "--workers", "0", "--no-plots", "--out", out,
                                   "--results", os.path.join(runs["base"], "results.jsonl")])
    return json.load(open(os.path.join(out, "metrics.json")))


def test_stages_end_to_end_on_the_sample_or_its_names(v2_runs):
    root = v2_runs["root"]
    meta = json.load(open(os.path.join(v2_runs["patch"], "patched.json")))
    assert meta["dataset"] == "bigearthnet19_v2" and meta["classes"] == NAMES19
    rows = release_rows(v2_runs["root"])
    train = sorted(p for p, r in rows.items() if r["split"] == "train")
    recorded = open(os.path.join(v2_runs["patch"], "train_scenes.txt")).read().split()  # ids, then v1.0 names
    assert recorded == [os.path.relpath(s2_folder(".", p)) for p in train] + \
        [f"bigearthnet:{rows[p]['s2v1_name']}" for p in train]
    for student, data in (("align", "bigearthnet19_v2 bigearthnet5_v2"), ("align_s1", "bigearthnet19_v2_s1")):
        for name in data.split():
            result = evaluate(v2_runs, f"{student}-{name}", "--ckpt", v2_runs[student], "--data",
                              f"{name}={root}")
            assert result["n_images"] == 6 and result["n_classes"] == (5 if "5_" in name else 19)
            assert result["case"] == {"clip_rgb": "trained on", "student_ms": "trained on"}
            zs = result["metrics"]["zeroshot"]["student_ms"]
            assert 0 <= zs["mean_average_precision"] <= 1 and len(zs["per_class_ap"]) == result["n_classes"]
    record = torch.load(os.path.join(v2_runs["align_s1"], "student.pt"), weights_only=True)
    assert record["bands"] == ["VV", "VH"] and record["dataset"] == "bigearthnet19_v2_s1"


def test_across_versions_the_training_scenes_are_dropped(v2_runs, capsys):
    """A CLIP patched on v1.0 meets v2.0: 5 of the 6 v2.0 test patches were v1.0 training patches (by their
    v1.0 names); they are dropped, counted, recorded. A CLIP patched on v2.0 meets v1.0: the same, by the v1.0
    names its record keeps; none left is refused in one line."""
    v1_train = set(C.load_split("bigearthnet19", v2_runs["v1"], "train", 0).files)
    rows = release_rows(v2_runs["root"])
    test = [r for r in rows.values() if r["split"] == "test"]
    overlap = sum(r["s2v1_name"] in v1_train for r in test)
    assert overlap == 5
    result = evaluate(v2_runs, "v1-on-v2", "--ckpt", v2_runs["v1_patch"], "--data",
                      f"bigearthnet19_v2={v2_runs['root']}")
    assert result["n_images"] == 6 - overlap == 1
    assert result["case"]["clip_rgb"] == "transfer (5 of 6 scenes dropped: trained on in bigearthnet19; 1 remain)"
    assert "clip_rgb: transfer (5 of 6 scenes dropped" in capsys.readouterr().out
    v2_train = {rows[p]["s2v1_name"] for p in rows if rows[p]["split"] == "train"}
    v1_all = C.list_scenes("bigearthnet19", v2_runs["v1"]).files
    result = evaluate(v2_runs, "v2-on-v1", "--ckpt", v2_runs["align"], "--data", f"bigearthnet19={v2_runs['v1']}",
                      "--split", "all")
    assert result["n_images"] == len(v1_all) - len(v2_train & set(v1_all)) and len(v2_train & set(v1_all)) == 6
    assert result["case"]["student_ms"].startswith("transfer (6 of 18 scenes dropped: trained on in bigearthnet19_v2")
    v1_val = C.load_split("bigearthnet19", v2_runs["v1"], "val", 0).files
    assert set(v1_val) <= v2_train  # v1.0's one val patch is a v2.0 training patch: none would remain
    with pytest.raises(SystemExit) as e:
        load_stage("03_eval.py").main(["--ckpt", v2_runs["patch"], "--data", f"bigearthnet19={v2_runs['v1']}",
                                       "--split", "val", "--workers", "0", "--out", str(v2_runs["base"] / "none")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "is empty once the 1 scenes its models trained on in another release" in line
