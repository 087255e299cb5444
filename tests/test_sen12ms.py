"""SEN12MS (the paper's fifth evaluation data set), generated in its real layout: file names and folders
as the SEN12MS release, bands-first 13-band uint16 tifs, the toolbox's label pickle and split lists.
No real SEN12MS sample is reachable here; the figures on the real data were not measured."""
import json
import os
import pickle

import numpy as np
import pytest
import tifffile
import torch
from conftest import TINY_STUDENT, load_stage

import common as C

evaluate = load_stage("03_eval.py")
align = load_stage("02_align_s2.py")
SCENES = {"ROIs1158_spring": [(1, "train"), (2, "train"), (3, "train"), (4, "test")],
          "ROIs2017_winter": [(7, "train"), (8, "train"), (9, "test")]}
# the toolbox's simplified scheme as a 17 -> 10 matrix, written out here (not with common.py's sums)
TO_10 = np.zeros((17, 10))
for igbp, simple in enumerate([0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 5, 7, 8, 9]):
    TO_10[igbp, simple] = 1


def make_sen12ms(root, per_scene=4, size=32, seed=0):
    """Patches ROIs<id>_<season>/s2_<scene>/ROIs<id>_<season>_s2_<scene>_p<n>.tif (13 bands first,
    uint16), IGBP_probability_labels.pkl (17 shares a patch) and the two split lists."""
    rng = np.random.default_rng(seed)
    shares, lists = {}, {"train": [], "test": []}
    for season, scenes in SCENES.items():
        for scene, split in scenes:
            folder = os.path.join(root, season, f"s2_{scene}")
            os.makedirs(folder)
            for n in range(per_scene):
                pid = f"{season}_s2_{scene}_p{n}.tif"
                bands = rng.integers(0, 4000, (13, size, size)).astype(np.uint16)
                bands[8] = 5000 + n  # B8A, stored after B08: recognisable
                tifffile.imwrite(os.path.join(folder, pid), bands, photometric="minisblack", planarconfig="separate")
                p = rng.dirichlet(np.full(17, 0.3))
                shares[pid] = p
                lists[split].append(pid)
    with open(os.path.join(root, "IGBP_probability_labels.pkl"), "wb") as f:
        pickle.dump(shares, f)
    for split, names in lists.items():
        with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return str(root), shares, lists


def test_listing_targets_and_splits_against_the_toolbox_rule(tmp_path):
    root, shares, lists = make_sen12ms(tmp_path / "sen12ms")
    os.remove(os.path.join(root, "ROIs2017_winter", "s2_9", "ROIs2017_winter_s2_9_p3.tif"))  # listed, not on disk
    scenes = C.list_scenes("sen12ms", root)
    assert scenes.classes == list(C.SEN12MS_CLASSES) and scenes.multilabel
    assert scenes.left_out == {"listed but not on disk": 1} and len(scenes.files) == 27
    for file, target, split in zip(scenes.files, scenes.labels, scenes.official_split):
        pid = os.path.basename(file)
        assert np.array_equal(target, (shares[pid] @ TO_10 >= 0.1).astype(np.uint8)), pid
        assert split == "test" if pid in lists["test"] else split in ("train", "val")
    scene_of = {f: os.path.dirname(f) for f in scenes.files}
    val = {scene_of[f] for f, s in zip(scenes.files, scenes.official_split) if s == "val"}
    train = {scene_of[f] for f, s in zip(scenes.files, scenes.official_split) if s == "train"}
    assert not val & train  # whole scenes: no val patch shares a scene with a train patch
    import hashlib  # the val rule computed here: SHA-256("0/<season>/<scene>") in the first tenth
    expected = {d for d in set(scene_of.values()) if int(hashlib.sha256(f"0/{d}".encode()).hexdigest()[:16], 16)
                / 16 ** 16 < 0.1 and not d.endswith(("s2_4", "s2_9"))}
    assert val == expected


def test_bands_are_read_as_stored_and_reordered_for_the_student_and_the_composite(tmp_path):
    root, _, _ = make_sen12ms(tmp_path / "sen12ms", per_scene=1)
    scenes = C.load_split("sen12ms", root, "test", 0)
    batch = next(C.batch_loader(C.open_images(scenes), 4))
    stored = np.stack([tifffile.imread(os.path.join(root, f)) for f in scenes.files])  # (B, 13, H, W) bands first
    assert torch.equal(batch["images"], torch.from_numpy(stored.transpose(0, 2, 3, 1)))
    bands = C.s2_bands(batch["images"], scenes.pixels, "cpu")  # the student's order: B8A last
    assert torch.equal(bands[:, C.S2_BANDS.index("B8A")], torch.from_numpy(stored[:, 8]).float())
    assert torch.equal(bands[:, C.S2_BANDS.index("B09")], torch.from_numpy(stored[:, 9]).float())
    rgb = C.rgb_composite(bands, scenes.pixels.rgb_max)  # L1C: B04, B03, B02 x 255/3558
    expected = np.floor(np.clip(stored[:, [3, 2, 1]].astype(np.float64) * 255 / 3558, 0, 255))
    assert torch.equal(rgb, torch.from_numpy(expected).float())


def test_a_missing_label_file_is_one_line(tmp_path):
    root, _, _ = make_sen12ms(tmp_path / "sen12ms", per_scene=1)
    os.remove(os.path.join(root, "IGBP_probability_labels.pkl"))
    with pytest.raises(C.UserError, match="IGBP_probability_labels.pkl does not exist.*schmitt-muc/SEN12MS"):
        C.list_scenes("sen12ms", root)


def test_a_student_aligned_on_eurosat_is_evaluated_on_sen12ms_and_sen12ms_aligns(patched_run, tmp_path):
    root, _, lists = make_sen12ms(tmp_path / "sen12ms", per_scene=3)
    evaluate.main(["--ckpt", patched_run["ckpt"], "--data", f"sen12ms={root}", "--workers", "0", "--no-plots",
                   "--out", str(tmp_path / "eval"), "--results", str(tmp_path / "r.jsonl")])
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["case"] == {"clip_rgb": "transfer"} and metrics["split"] == "test"
    assert metrics["n_images"] == len(lists["test"]) and metrics["classes"] == list(C.SEN12MS_CLASSES)
    assert 0 <= metrics["metrics"]["zeroshot"]["clip_rgb"]["mean_average_precision"] <= 1
    result = align.main(["--teacher", patched_run["ckpt"], "--data", "sen12ms", "--root", root, *TINY_STUDENT,
                         "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-plots",
                         "--out", str(tmp_path / "align")])
    assert "val_map" in result["metrics"][-1]
