"""Shared test fixtures: a tiny open_clip CLIP, and small data sets in the real on-disk layouts.

The tiny CLIP ('rsclip-tiny': 32 px images, 2-layer towers, 32-d embeddings) is registered with
open_clip.add_model_config, so every stage builds it by name exactly as it builds ViT-B-32.
Stages are called in-process through their main(argv)."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import tifffile
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SAMPLE_MS = os.path.join(ROOT, "data", "eurosat_ms_sample")  # shipped: 200 real EuroSAT MS tifs
SHARED_BEN = os.path.join(ROOT, "..", "shared", "data", "bigearthnet_s2_sample")
SHARED_BEN_SPLITS = os.path.join(ROOT, "..", "shared", "data", "bigearthnet_splits")

TINY_CLIP = "rsclip-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_STUDENT = ["--student", "test_vit", "--input-size", "32"]  # timm's 0.5M-parameter test ViT
EUROSAT_CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]


def load_stage(name):
    """Import a stage file such as 01_patch_clip.py as a module."""
    spec = importlib.util.spec_from_file_location(name.replace(".py", "").lstrip("0123456789_"),
                                                  os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def tiny_clip_config(tmp_path_factory):
    import open_clip
    folder = tmp_path_factory.mktemp("open_clip_configs")
    with open(folder / f"{TINY_CLIP}.json", "w") as f:
        json.dump(TINY_CONFIG, f)
    open_clip.add_model_config(str(folder / f"{TINY_CLIP}.json"))
    with open(folder / f"{TINY_CLIP}-quickgelu.json", "w") as f:  # as open_clip's ViT-B-32-quickgelu
        json.dump({**TINY_CONFIG, "quick_gelu": True}, f)
    open_clip.add_model_config(str(folder / f"{TINY_CLIP}-quickgelu.json"))
    torch.set_num_threads(2)
    os.chdir(tmp_path_factory.mktemp("cwd"))  # default outputs (runs/results.jsonl, ...) stay out of the repository
    return TINY_CLIP


def hash_split(scene_ids, seed):
    """The split of each scene id as the README defines it, computed here without common.py:
    u = SHA-256("<seed>/<id>")'s first 16 hex digits / 16^16; train < 0.7 <= val < 0.8 <= test."""
    import hashlib
    u = [int(hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()[:16], 16) / 16 ** 16 for i in scene_ids]
    return ["train" if x < 0.7 else "val" if x < 0.8 else "test" for x in u]


def split_count(root, split, seed=0, pattern="*/*.tif"):
    """How many files of a class-folder data set fall in `split` (hash_split of <Class>/<stem>)."""
    import glob
    ids = [os.path.splitext(os.path.relpath(f, root))[0].replace(os.sep, "/")
           for f in glob.glob(os.path.join(root, pattern))]
    return hash_split(ids, seed).count(split)


def official_names(split, n, skip=()):
    """The first n patch names of an official BigEarthNet-S2 v1.0 list shipped in data/bigearthnet/."""
    import bz2
    with bz2.open(os.path.join(ROOT, "data", "bigearthnet", f"{split}.csv.bz2"), "rt") as f:
        names = [line.strip() for line in f if line.strip() and line.strip() not in skip]
    return names[:n]


BEN_BANDS = {"B01": 20, "B02": 120, "B03": 120, "B04": 120, "B05": 60, "B06": 60, "B07": 60, "B08": 120,
             "B8A": 60, "B09": 20, "B11": 60, "B12": 60}  # band -> pixels a side (BigEarthNet-S2 v1.0)


def make_bigearthnet_patch(folder, name, labels, seed=0):
    """One patch in the BigEarthNet-S2 v1.0 layout: folder/name/name_<band>.tif (uint16 at each band's
    own size, values as L2A digital numbers) and name_labels_metadata.json with 43-class label names."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    for band, size in BEN_BANDS.items():
        tifffile.imwrite(os.path.join(folder, name, f"{name}_{band}.tif"),
                         rng.integers(0, 4000, (size, size)).astype(np.uint16))
    with open(os.path.join(folder, name, f"{name}_labels_metadata.json"), "w") as f:
        json.dump({"labels": list(labels), "acquisition_date": "2017-06-13 10:10:31"}, f)


def class_signal(label, n_classes):
    """A per-class brightness pattern over the 13 bands, so that the classes are learnable."""
    phase = 2 * np.pi * label / n_classes
    return 1500 + 1200 * np.sin(np.linspace(0, 3 * np.pi, 13) + phase)


def make_eurosat_ms(root, per_class=6, classes=EUROSAT_CLASSES, size=64, seed=0):
    """13-band uint16 GeoTIFFs in EuroSAT MS's layout: root/<Class>/<Class>_<n>.tif, (H, W, 13)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for n in range(1, per_class + 1):
            base = class_signal(label, len(classes))[None, None, :]
            image = base + rng.normal(0, 300, (size, size, 13))
            tifffile.imwrite(os.path.join(root, name, f"{name}_{n}.tif"), np.clip(image, 0, 10000).astype(np.uint16),
                             photometric="minisblack", planarconfig="contig")  # 13 samples a pixel, as EuroSAT's
    return str(root)


def make_eurosat_rgb(root, per_class=6, classes=EUROSAT_CLASSES, size=64, seed=0):
    """8-bit jpgs in torchvision's EuroSAT layout: root/eurosat/2750/<Class>/<Class>_<n>.jpg."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "eurosat", "2750")
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        colour = 127 + 100 * np.sin(2 * np.pi * label / len(classes) + np.array([0.0, 2.1, 4.2]))
        for n in range(1, per_class + 1):
            image = np.clip(colour[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(folder, name, f"{name}_{n}.jpg"), quality=95)
    return str(root)


@pytest.fixture
def ms_root(tmp_path):
    return make_eurosat_ms(tmp_path / "EuroSAT_MS")


@pytest.fixture
def rgb_root(tmp_path):
    return make_eurosat_rgb(tmp_path / "eurosat_rgb")


def tiny_patch_args(root, out, data="eurosat_ms", *extra):
    """Stage-1 flags for a run of a few seconds with the tiny CLIP."""
    return ["--data", data, "--root", str(root), "--model", TINY_CLIP, "--pretrained", "none",
            "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--workers", "0",
            "--alphas", "0", "0.5", "1", "--out", str(out), *extra]


@pytest.fixture(scope="session")
def patched_run(tmp_path_factory, tiny_clip_config):
    """One finished stage-1 run on generated EuroSAT MS tifs, shared by the later stages' tests."""
    base = tmp_path_factory.mktemp("patched_run")
    root = make_eurosat_ms(base / "EuroSAT_MS")
    out = base / "patch"
    load_stage("01_patch_clip.py").main(tiny_patch_args(root, out))
    return {"root": root, "out": str(out), "ckpt": str(out)}
