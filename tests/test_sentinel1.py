"""A Sentinel-1 (SAR) student: BigEarthNet-S1 v1.0 patches (VV, VH in dB) aligned to the CLIP's view
of their Sentinel-2 partners' RGB composites; the real S1+S2 sample (where present) plus generated
pairs in the same layout, as the two archives unpack side by side."""
import json
import os
import shutil

import numpy as np
import pytest
import tifffile
import torch
from conftest import ROOT, SHARED_BEN, TINY_STUDENT, load_stage, make_bigearthnet_patch, official_names

import common as C

align = load_stage("02_align_s2.py")
evaluate = load_stage("03_eval.py")
SHARED_S1 = os.path.join(ROOT, "..", "shared", "data", "bigearthnet_s1_sample")


def make_pairs(root, per_split=3, seed=0):
    """root/BigEarthNet-v1.0/<S2 patch>/ and root/BigEarthNet-S1-v1.0/<S1 patch>/ (VV, VH float32 dB,
    a labels json naming its S2 partner); the real sample pairs copied in where present."""
    rng = np.random.default_rng(seed)
    s2, s1 = os.path.join(root, "BigEarthNet-v1.0"), os.path.join(root, "BigEarthNet-S1-v1.0")
    real = os.path.isdir(SHARED_BEN) and os.path.isdir(SHARED_S1)
    for source, target in ((SHARED_BEN, s2), (SHARED_S1, s1)) if real else ():
        for name in os.listdir(source):
            if os.path.isdir(os.path.join(source, name)):
                shutil.copytree(os.path.join(source, name), os.path.join(target, name))
    labels = [["Mixed forest"], ["Pastures", "Non-irrigated arable land"], ["Sea and ocean"]]
    for split in ("train", "val", "test"):
        for k, partner in enumerate(official_names(split, per_split)):
            make_bigearthnet_patch(s2, partner, labels[k % 3], seed=k)
            name = f"S1B_IW_GRDH_1SDV_GENERATED_{split}_{k}"
            os.makedirs(os.path.join(s1, name))
            for band, mean in (("VV", -12.0), ("VH", -19.0)):
                db = (mean + 3 * rng.standard_normal((120, 120))).astype(np.float32)
                tifffile.imwrite(os.path.join(s1, name, f"{name}_{band}.tif"), db)
            with open(os.path.join(s1, name, f"{name}_labels_metadata.json"), "w") as f:
                json.dump({"labels": labels[k % 3], "corresponding_s2_patch": partner}, f)
    return str(root), real


def test_s1_patches_take_their_partners_split_and_read_as_stored(tmp_path):
    root, real = make_pairs(tmp_path / "ben")
    scenes = C.list_scenes("bigearthnet19_s1", root)
    split_of = C.official_splits()
    for name, split in zip(scenes.files, scenes.official_split):
        with open(os.path.join(root, "BigEarthNet-S1-v1.0", name, f"{name}_labels_metadata.json")) as f:
            assert split == split_of[json.load(f)["corresponding_s2_patch"]], name
    assert len(scenes.files) == 9 + (5 if real else 0)  # the real snow patch's partner is off the lists
    test = C.load_split("bigearthnet19_s1", root, "test", 0)
    batch = next(C.batch_loader(C.open_images(test), 8))
    *s2_parts, sar = batch["images"]
    assert sar.dtype == torch.float32 and sar.shape[1:] == (120, 120, 2)
    for i, name in enumerate(test.files):  # VV then VH, float dB as stored (never cast to integers)
        for k, band in enumerate(("VV", "VH")):
            stored = tifffile.imread(os.path.join(root, "BigEarthNet-S1-v1.0", name, f"{name}_{band}.tif"))
            assert torch.equal(sar[i, ..., k], torch.from_numpy(stored))
    x = C.ms_input(batch["images"], 120, "cpu", test.pixels)  # the student's input: z-scored dB
    vv = sar[..., 0].numpy()
    np.testing.assert_allclose(x[:, 0].numpy(), (vv - -12.620) / 5.116, rtol=1e-5, atol=1e-5)
    composite = C.rgb_composite(C.s2_bands(batch["images"], test.pixels, "cpu"), 2000.0)  # the teacher: S2's RGB
    assert torch.equal(composite[:, 0], torch.floor(torch.clamp(s2_parts[0][..., 2].float() * 255 / 2000, 0, 255)))


def test_a_missing_partner_is_named_with_both_patches(tmp_path):
    root, _ = make_pairs(tmp_path / "ben", per_split=2)
    scenes = C.load_split("bigearthnet19_s1", root, "train", 0)
    name = next(f for f in scenes.files if "GENERATED" in f)
    partner = json.load(open(os.path.join(root, "BigEarthNet-S1-v1.0", name, f"{name}_labels_metadata.json")))
    shutil.rmtree(os.path.join(root, "BigEarthNet-v1.0", partner["corresponding_s2_patch"]))
    with pytest.raises(C.UserError, match=f"{name}.*{partner['corresponding_s2_patch']}.*does not exist"):
        list(C.batch_loader(C.open_images(scenes), 8))


def test_an_ssl4eo_s1_mae_checkpoint_loads_into_a_two_band_student(tmp_path, capsys):
    student = C.Student("test_vit", 32, input_size=32, in_chans=2)
    torch.manual_seed(1)
    encoder = C.Student("test_vit", 32, input_size=32, in_chans=2).backbone.state_dict()
    decoder = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64),
               "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pred.weight": torch.zeros(512, 32)}
    torch.save({"model": {**encoder, **decoder}, "epoch": 99}, tmp_path / "mae.pth")  # MAE: encoder + decoder
    align.load_backbone_weights(student, str(tmp_path / "mae.pth"), "ssl4eo")
    assert all(torch.equal(student.backbone.state_dict()[k], v) for k, v in encoder.items())
    assert "mask_token" in capsys.readouterr().out  # the decoder is named as unexpected, not loaded


def test_align_and_evaluate_a_sentinel1_student(patched_run, tmp_path, capsys):
    root, _ = make_pairs(tmp_path / "ben", per_split=3)
    result = align.main(["--teacher", patched_run["ckpt"], "--data", "bigearthnet19_s1", "--root", root,
                         *TINY_STUDENT, "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-plots",
                         "--out", str(tmp_path / "align")])
    record = torch.load(tmp_path / "align" / "student.pt", weights_only=True)
    assert record["bands"] == ["VV", "VH"] and record["in_chans"] == 2 and "db_mean_std" in record["normalisation"]
    assert result["student"].backbone.patch_embed.proj.in_channels == 2
    evaluate.main(["--ckpt", str(tmp_path / "align"), "--data", f"bigearthnet19_s1={root}", "--workers", "0",
                   "--no-plots", "--out", str(tmp_path / "eval"), "--results", str(tmp_path / "r.jsonl")])
    m = json.load(open(tmp_path / "eval" / "metrics.json"))["metrics"]
    assert {"zeroshot", "text_to_image", "cross_modal", "modality_gap"} <= set(m)  # SAR <-> RGB retrieval, its gap
    assert 0 <= m["zeroshot"]["student_ms"]["mean_average_precision"] <= 1
    with pytest.raises(SystemExit):  # a Sentinel-1 student meets Sentinel-2 data: one line
        evaluate.main(["--ckpt", str(tmp_path / "align"), "--data", f"bigearthnet19={root}", "--workers", "0",
                       "--out", str(tmp_path / "eval2"), "--results", str(tmp_path / "r.jsonl")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: the student reads VV/VH") and "--data bigearthnet19_s1" in line
