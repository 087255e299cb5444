"""Runs sharing one --cache (a reviewer's scenario: three runs started together; there was no lock
around packing, and one run's start deleted another's half-written packed-*.tmp, so one run read a
half-written pack and evaluated all-zero images with exit code 0, the other crashed). A pack is
written once, completely, or not used: checked against the tifs read here with tifffile."""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from conftest import EUROSAT_CLASSES, ROOT, make_eurosat_ms

import common as C


def tifs(scenes):
    """The split's images read here, one tif at a time, in the split's order."""
    return np.stack([tifffile.imread(os.path.join(scenes.root, f)) for f in scenes.files])


def packed_images(folder):
    """A pack's images read here: images.bin, the images' bytes one after another, shaped by shapes.npy."""
    shapes = np.load(folder / "shapes.npy")
    assert (shapes == shapes[0]).all()
    return np.fromfile(folder / "images.bin", C.read_json(folder / "files.json")["dtypes"][0]).reshape(len(shapes), *shapes[0])


def tree(folder):
    """{relative path: SHA-256 of its bytes} of every file under a folder."""
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


@pytest.mark.parametrize("suffix", ["", "k3j9x_2q"], ids=["packed-KEY.tmp", "packed-KEY.tmpXXXX"])
def test_another_runs_unfinished_pack_is_left_alone_and_not_used(tmp_path, suffix):
    root = make_eurosat_ms(tmp_path / "ms", per_class=5, classes=EUROSAT_CLASSES[:3], size=16)
    scenes = C.load_split("eurosat_ms", root, "train", 0)
    cache = tmp_path / "cache"
    key = "packed-" + C.sha256_of(C.scenes_key(scenes))[:16]
    # another run, still packing this split: its images.bin holds the first 2 images so far
    other = cache / f"{key}.tmp{suffix}"
    other.mkdir(parents=True)
    (other / "images.bin").write_bytes(tifs(scenes)[:2].tobytes())
    before = tree(other)

    packed = C.open_images(scenes, cache=str(cache))
    assert isinstance(packed, C.PackedImages)
    assert sorted(os.listdir(cache)) == sorted([key, other.name])  # its own pack published; the other's untouched
    assert tree(other) == before
    expected = tifs(scenes)
    assert np.array_equal(np.asarray(packed.parts[0]), expected)
    assert np.array_equal(packed_images(cache / key), expected)
    assert np.array_equal(np.load(cache / key / "labels.npy"), scenes.labels)
    # the batches are those of the files
    files = C.open_images(scenes)
    a, b = list(C.batch_loader(packed, 4)), list(C.batch_loader(files, 4))
    assert len(a) == len(b) == -(-len(scenes.files) // 4)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in ("images", "labels", "index"))


PACK = r"""
import json, os, sys, time
code, data, cache, ready, go = sys.argv[1:]
sys.path.insert(0, code)
import numpy as np
import tifffile
import common as C
scenes = C.load_split("eurosat_ms", data, "train", 0)
expected = np.stack([tifffile.imread(os.path.join(scenes.root, f)) for f in scenes.files])
open(ready, "w").close()
deadline = time.time() + 120
while not os.path.exists(go):  # both processes start packing at the same moment
    if time.time() > deadline:
        sys.exit("no go")
    time.sleep(0.001)
packed = C.open_images(scenes, cache=cache)
got = np.asarray(packed.parts[0])
print(json.dumps({"packed": isinstance(packed, C.PackedImages), "equal": bool(np.array_equal(got, expected)),
                  "all_zero_images": int((got.reshape(len(got), -1).max(1) == 0).sum())}))
"""


def test_two_runs_packing_one_split_into_one_cache_at_once(tmp_path):
    """Two processes pack the same split into one cache at the same moment (a start signal after both
    have listed the split; packing its 221 tifs takes far longer than the two starts differ): both
    finish, each with a pack equal to the tifs, and the cache holds that one pack and nothing else."""
    root = make_eurosat_ms(tmp_path / "ms", per_class=30, size=32)
    cache, go = tmp_path / "cache", tmp_path / "go"
    ready = [tmp_path / f"ready{n}" for n in range(2)]
    runs = [subprocess.Popen([sys.executable, "-c", PACK, ROOT, root, str(cache), str(r), str(go)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    try:
        deadline = time.time() + 120
        while not all(r.exists() for r in ready) and all(p.poll() is None for p in runs) and time.time() < deadline:
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=120) for p in runs]
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(runs, outputs):
        assert p.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result == {"packed": True, "equal": True, "all_zero_images": 0}, (result, out)
    packs = [d for d in os.listdir(cache) if d.startswith("packed-")]
    assert len(packs) == 1 and not [d for d in os.listdir(cache) if ".tmp" in d], os.listdir(cache)
    scenes = C.load_split("eurosat_ms", root, "train", 0)
    assert len(scenes.files) > 150  # 70% of 300: packing takes a while
    assert np.array_equal(packed_images(cache / packs[0]), tifs(scenes))
    assert np.array_equal(np.load(cache / packs[0] / "labels.npy"), scenes.labels)
    assert json.load(open(cache / packs[0] / "files.json"))["files"] == scenes.files
