"""The data layer: splits, readers, the packed cache, batch order, and the device-side transforms
checked against open_clip's own CPU preprocessing and against numpy."""
import glob
import os

import numpy as np
import pytest
import tifffile
import torch
import torchvision.transforms.functional as TVF
import torch.nn.functional as F
from conftest import (EUROSAT_CLASSES, SAMPLE_MS, TINY_CLIP, hash_split, load_stage, make_eurosat_ms, make_eurosat_rgb,
                      split_count)
from PIL import Image

import common as C


def np_composite(ms, rgb_max=3558):
    """EuroSAT's RGB from 13-band digital numbers (H, W, 13), in float64 numpy: B04, B03, B02 are
    the bands at index 3, 2, 1 of B01..B12,B8A; x 255/rgb_max, clipped to 0..255, truncated."""
    return np.floor(np.clip(ms[..., [3, 2, 1]].astype(np.float64) * 255 / rgb_max, 0, 255)).astype(np.uint8)


def shared_tifs(every=10):
    return sorted(glob.glob(os.path.join(SAMPLE_MS, "*", "*.tif")))[::every]


# ----------------------------------------------------------------------------- splits


def test_split_is_a_hash_of_seed_and_scene_id_disjoint_complete_and_deterministic(tmp_path):
    root = make_eurosat_ms(tmp_path / "ms", per_class=10, size=8)
    for n in range(1, 4):  # Forest keeps 7 files: classes of different sizes
        os.remove(os.path.join(root, "Forest", f"Forest_{n}.tif"))
    scenes = C.list_scenes("eurosat_ms", root)
    split = C.split_indices(scenes, seed=0)
    again = C.split_indices(C.list_scenes("eurosat_ms", root), seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in ("train", "val", "test"))
    everything = np.concatenate([split["train"], split["val"], split["test"]])
    assert sorted(everything.tolist()) == list(range(len(scenes.files)))  # disjoint and complete
    expected = hash_split([os.path.splitext(f)[0].replace(os.sep, "/") for f in scenes.files], seed=0)  # independent of common.py
    for k in ("train", "val", "test"):
        assert [scenes.files[i] for i in split[k]] == [f for f, s in zip(scenes.files, expected) if s == k]
    # load_split returns exactly those files, labelled by their folder
    for k in ("train", "val", "test"):
        part = C.load_split("eurosat_ms", root, k, 0)
        assert part.files == [scenes.files[i] for i in split[k]] and (part.split, part.seed) == (k, 0)
        assert [part.classes[y] for y in part.labels] == [f.split(os.sep)[0] for f in part.files]


def test_split_fractions_hold_on_many_scenes():
    ids = [f"Class{c}/Class{c}_{n}" for c in range(10) for n in range(2000)]
    names = np.array(C.hashed_split(ids, seed=3))
    for k, fraction in C.SPLIT_FRACTIONS.items():  # binomial standard deviation ~0.003 at 20,000 scenes
        assert abs(np.mean(names == k) - fraction) < 0.015, k
    assert C.hashed_split(ids[:50], seed=3) == names[:50].tolist()  # a scene's split ignores the others


def test_split_has_the_same_scenes_for_rgb_jpgs_and_ms_tifs_and_follows_the_seed(tmp_path):
    ms = make_eurosat_ms(tmp_path / "ms", per_class=10, size=8)
    rgb = make_eurosat_rgb(tmp_path / "rgb", per_class=10, size=8)
    stems = lambda s: [os.path.splitext(f)[0] for f in s.files]
    for seed in (0, 1):
        for k in ("train", "val", "test"):
            a, b = C.load_split("eurosat_ms", ms, k, seed), C.load_split("eurosat", rgb, k, seed)
            assert stems(a) == stems(b) and np.array_equal(a.labels, b.labels)
            assert all(f.endswith(".tif") for f in a.files) and all(f.endswith(".jpg") for f in b.files)
    assert stems(C.load_split("eurosat_ms", ms, "train", 0)) != stems(C.load_split("eurosat_ms", ms, "train", 1))


def test_a_split_without_files_is_a_user_error(tmp_path):
    root = make_eurosat_ms(tmp_path / "ms", per_class=4, classes=EUROSAT_CLASSES[:3], size=8)
    scenes = C.list_scenes("eurosat_ms", root)
    for f, split in zip(scenes.files, hash_split([os.path.splitext(f)[0].replace(os.sep, "/") for f in scenes.files], 0)):
        if split == "val":  # leave no val scene
            os.remove(os.path.join(root, f))
    val = C.load_split("eurosat_ms", root, "val", 0)
    with pytest.raises(C.UserError, match="val split .* is empty"):
        C.open_images(val)


# ----------------------------------------------------------------------------- readers


def test_read_s2_tif_checks_bands_and_dtype_and_accepts_bands_first(tmp_path):
    image = np.random.default_rng(0).integers(0, 5000, (16, 16, 13)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "hwc.tif", image)
    tifffile.imwrite(tmp_path / "chw.tif", image.transpose(2, 0, 1))
    tifffile.imwrite(tmp_path / "rgb.tif", image[..., :3])
    tifffile.imwrite(tmp_path / "float.tif", image.astype(np.float32))
    (tmp_path / "broken.tif").write_bytes((tmp_path / "hwc.tif").read_bytes()[:1000])
    assert np.array_equal(C.read_s2_tif(str(tmp_path / "hwc.tif")), image)
    assert np.array_equal(C.read_s2_tif(str(tmp_path / "chw.tif")), image)
    assert C.DATA["eurosat_ms"].reader is C.read_s2_tif  # the reader the stages use for EuroSAT MS
    for name, reason in (("rgb.tif", "(16, 16, 3)"), ("float.tif", "float32"), ("broken.tif", "cannot read")):
        with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            C.read_s2_tif(str(tmp_path / name))


def test_image_files_reports_bad_files_per_batch_and_keeps_odd_rgb_tiles_whole(tmp_path):
    root = make_eurosat_rgb(tmp_path / "rgb", per_class=2, classes=EUROSAT_CLASSES[:2], size=16)
    scenes = C.list_scenes("eurosat", root)
    (open(os.path.join(scenes.root, scenes.files[0]), "wb")).write(b"not a jpeg")  # the very first file
    Image.fromarray(np.full((20, 12, 3), 77, np.uint8)).save(os.path.join(scenes.root, scenes.files[2]))
    files = C.ImageFiles(scenes)  # the first readable file sets the size
    assert files.shapes == [(16, 16, 3)] and files.dtypes == [np.uint8]
    batch = files[[0, 1, 2, 3]]
    assert [os.path.basename(p) for p, _ in batch["bad"]] == [os.path.basename(scenes.files[0])]
    assert batch["index"].tolist() == [1, 2, 3] and batch["labels"].tolist() == scenes.labels[1:].tolist()
    # images of several sizes come as an ImageList, each as stored: the 20x12 tile is neither resized nor squashed
    assert [tuple(image.shape) for image in batch["images"]] == [(16, 16, 3), (20, 12, 3), (16, 16, 3)]
    assert torch.all(batch["images"][1] == 77) and batch["images"][0].dtype == torch.uint8
    assert files[[1, 3]]["images"].shape == (2, 16, 16, 3)  # one size: one tensor


@pytest.mark.parametrize("cache", [False, True], ids=["files", "--cache"])
def test_landscape_and_portrait_in_one_batch_reach_clip_as_open_clip_preprocesses_them(tmp_path, cache):
    """A reviewer's scenario: a 375x500 portrait after a 500x375 landscape (as ImageNet's validation
    images) was resized to the landscape's size before CLIP's resize and crop (cosine 0.93 to open_clip's
    own preprocessing and encoding of the file). Each image must equal open_clip's preprocess +
    encode_image of its file, whatever else is in its batch, also through a packed cache."""
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, force_image_size=64)
    model.eval()
    rng = np.random.default_rng(0)
    for k, (name, (h, w)) in enumerate([("a_land", (75, 100)), ("b_port", (100, 75)), ("c_odd", (64, 61))]):
        os.makedirs(tmp_path / "folder" / f"class{k}")
        y, x = np.mgrid[0:h, 0:w]  # a scene with structure in both directions, so a squash shows
        image = np.stack([(x * 255 // w), (y * 255 // h), rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "folder" / f"class{k}" / f"{name}.png")
    scenes = C.load_split("folder", str(tmp_path / "folder"), "all", 0)
    dataset = C.open_images(scenes, cache=str(tmp_path / "cache") if cache else None)
    batch = next(C.batch_loader(dataset, 8))
    assert isinstance(batch["images"], C.ImageList) and len(batch["images"]) == 3
    got = C.clip_input(batch["images"], model.visual.preprocess_cfg, "cpu")
    expected = torch.stack([preprocess(Image.open(tmp_path / "folder" / f)) for f in scenes.files])
    assert (got - expected).abs().max() < 0.02  # normalised units: about one grey level of 255
    with torch.no_grad():
        cosine = F.cosine_similarity(model.encode_image(got), model.encode_image(expected))
    assert cosine.min() > 0.999, cosine


# ----------------------------------------------------------------------------- batches and the packed cache


class Indices(torch.utils.data.Dataset):
    """A batch is its indices (as ImageFiles' batches: a dict with 'index' and 'bad')."""
    def __len__(self):
        return 23

    def __getitem__(self, indices):
        return {"index": torch.tensor(indices), "bad": []}


def test_batch_loader_order_depends_on_seed_and_epoch():
    order = lambda **kw: [b["index"].tolist() for b in C.batch_loader(Indices(), 5, **kw)]
    plain = order()
    assert plain == [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    shuffled = order(train=True, seed=3, epoch=1)
    assert shuffled == order(train=True, seed=3, epoch=1)
    assert sorted(sum(shuffled, [])) == list(range(23)) and shuffled != plain
    assert shuffled != order(train=True, seed=3, epoch=2) and shuffled != order(train=True, seed=4, epoch=1)
    assert order(train=True, shuffle=False, seed=3, epoch=1) == plain  # stage 2's --no-shuffle, as the official run


def all_batches(dataset, **kw):
    return [{k: v for k, v in b.items() if k != "bad"} for b in C.batch_loader(dataset, 4, **kw)]


def test_packed_cache_equals_the_files_is_reused_and_is_rekeyed(tmp_path, capsys):
    root = make_eurosat_ms(tmp_path / "ms", per_class=6, classes=EUROSAT_CLASSES[:3], size=16)
    cache = str(tmp_path / "cache")
    train = C.load_split("eurosat_ms", root, "train", 0)
    packed = C.open_images(train, cache=cache)
    assert "packing" in capsys.readouterr().out
    files = C.open_images(train)
    assert isinstance(packed, C.PackedImages) and isinstance(files, C.ImageFiles)
    for kw in ({}, {"train": True, "seed": 5, "epoch": 2}):
        a, b = all_batches(packed, **kw), all_batches(files, **kw)
        n = split_count(root, "train")
        assert len(a) == len(b) == (C.training_batches(n, 4) if kw else -(-n // 4))  # batches of 4 (training: none of 1)
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
            assert x["images"].dtype == torch.uint16
    # the images are those of the files on disk, in the split's order
    first = tifffile.imread(os.path.join(root, train.files[0]))
    assert np.array_equal(np.asarray(packed.parts[0][0]), first)
    folders = sorted(os.listdir(cache))
    stamp = os.path.getmtime(os.path.join(cache, folders[0], "images.bin"))
    again = C.open_images(train, cache=cache)
    assert "packing" not in capsys.readouterr().out and sorted(os.listdir(cache)) == folders
    assert os.path.getmtime(os.path.join(cache, folders[0], "images.bin")) == stamp
    assert torch.equal(again[[0, 1]]["images"], packed[[0, 1]]["images"])
    # another split or another split seed packs another folder
    C.open_images(C.load_split("eurosat_ms", root, "val", 0), cache=cache)
    C.open_images(C.load_split("eurosat_ms", root, "train", 1), cache=cache)
    assert capsys.readouterr().out.count("packing") == 2
    assert len(set(os.listdir(cache)) - set(folders)) == 2


def test_packed_cache_refuses_a_bad_file_and_leaves_no_pack(tmp_path):
    root = make_eurosat_ms(tmp_path / "ms", per_class=6, classes=EUROSAT_CLASSES[:2], size=16)
    train = C.load_split("eurosat_ms", root, "train", 0)
    open(os.path.join(root, train.files[3]), "wb").write(b"II*\0garbage")
    with pytest.raises(C.UserError, match=os.path.basename(train.files[3]) + ".*--cache"):
        C.open_images(train, cache=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []  # no pack, and no half-made one either


# ----------------------------------------------------------------------------- the RGB composite


@pytest.mark.parametrize("dataset, rgb_max", [("eurosat_ms", 3558), ("bigearthnet19", 2000)])
def test_rgb_composite_equals_numpy_for_every_digital_number(dataset, rgb_max):
    dn = np.arange(0, 65536, dtype=np.uint16)
    ms = np.zeros((1, 1, dn.size, 13), np.uint16)
    rng = np.random.default_rng(0)
    for band in range(13):  # every band a different permutation, so a wrong band order shows
        ms[0, 0, :, band] = rng.permutation(dn)
    assert C.DATA[dataset].pixels.rgb_max == rgb_max  # L1C's constant, L2A's (the official code's)
    got = C.rgb_composite(torch.from_numpy(ms).permute(0, 3, 1, 2).float(), C.DATA[dataset].pixels.rgb_max)
    assert torch.equal(got[0].permute(1, 2, 0), torch.from_numpy(np_composite(ms[0], rgb_max)).float())
    assert C.S2_BANDS[3] == "B04" and C.S2_BANDS[2] == "B03" and C.S2_BANDS[1] == "B02"


# ----------------------------------------------------------------------------- device-side transforms


@pytest.fixture(scope="module", params=[None, 224], ids=["32px", "224px"])
def clip_preprocess(request):
    """open_clip's own validation transform (PIL) and the model's preprocess_cfg: the tiny CLIP at
    its 32 px (EuroSAT's 64 px tiles shrink) and at 224 px (they grow, as with ViT-B-32)."""
    import open_clip
    kw = {} if request.param is None else {"force_image_size": request.param}
    model, _, preprocess_val = open_clip.create_model_and_transforms(TINY_CLIP, **kw)
    return preprocess_val, dict(model.visual.preprocess_cfg)


def image_files(source, tmp_path):
    """(files, modality) of one source of 64x64 tiles: generated jpgs, generated tifs or real tifs."""
    if source == "real tifs":
        if not os.path.isdir(SAMPLE_MS):
            pytest.skip(f"{SAMPLE_MS} (200 real EuroSAT MS tifs) is not present")
        return shared_tifs(), "ms"
    if source == "generated jpgs":
        root = make_eurosat_rgb(tmp_path / "rgb", per_class=1)
        return sorted(glob.glob(os.path.join(root, "eurosat", "2750", "*", "*.jpg"))), "rgb"
    return sorted(glob.glob(os.path.join(make_eurosat_ms(tmp_path / "ms", per_class=1), "*", "*.tif"))), "ms"


@pytest.mark.parametrize("source", ["generated jpgs", "generated tifs", "real tifs"])
def test_clip_input_matches_open_clip_preprocessing(tmp_path, clip_preprocess, source):
    preprocess_val, cfg = clip_preprocess
    files, modality = image_files(source, tmp_path)
    read = C.read_rgb if modality == "rgb" else C.read_s2_tif
    raw = torch.from_numpy(np.stack([read(f) for f in files]))
    pil = [Image.open(f).convert("RGB") if modality == "rgb" else Image.fromarray(np_composite(tifffile.imread(f)))
           for f in files]
    expected = torch.stack([preprocess_val(p) for p in pil])
    got = C.clip_input(raw, cfg, "cpu", pixels=C.DATA["eurosat_ms"].pixels if modality == "ms" else None)
    assert got.shape == expected.shape == (len(files), 3, cfg["size"][0], cfg["size"][1])
    assert (got - expected).abs().max() < 0.02  # normalised units: about one grey level of 255


def test_augmentation_flips_whole_images_and_is_drawn_from_seed_and_step(clip_preprocess):
    augmentation = load_stage("01_patch_clip.py").augmentation
    _, cfg = clip_preprocess
    raw = torch.randint(0, 255, (16, 40, 40, 3), dtype=torch.uint8)
    plain = C.clip_input(raw, cfg, "cpu")
    flipped = C.clip_input(raw, cfg, "cpu", augment=augmentation("flip", 0, 7))
    kinds = []
    for x, y in zip(plain, flipped):
        options = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
        kinds.append(next(i for i, o in enumerate(options) if torch.equal(o, y)))
    assert len(set(kinds)) > 1  # some images flipped, in more than one way
    assert torch.equal(flipped, C.clip_input(raw, cfg, "cpu", augment=augmentation("flip", 0, 7)))
    assert augmentation("none", 0, 7) is None


def test_official_augmentation_is_open_clips_crop_then_torchvisions_per_image_and_leaves_the_global_generator_alone():
    """--augment official: of each image as read, open_clip's train-time RandomResizedCrop (its own
    transform object: scale, ratio, size, bicubic, applied by torchvision to the 8-bit PIL image, as
    the official transforms.py keeps it), the flips of 'flip', then for each image its own draw of
    torchvision's ColorJitter(0.4, 0.4, 0.4) p 0.8, RandomGrayscale p 0.2, GaussianBlur((3, 7),
    (0.1, 2)) p 0.4, recomputed here from the same seed. Within 0.02: PIL rounds the crop to 8 bits."""
    import open_clip
    import torchvision.transforms.functional as TVF
    from PIL import Image
    from torchvision.transforms import v2
    augmentation = load_stage("01_patch_clip.py").augmentation
    crop = open_clip.image_transform(16, is_train=True).transforms[0]
    assert type(crop).__name__ == "RandomResizedCrop" and crop.scale == (0.9, 1.0)
    x = torch.randint(0, 256, (12, 3, 24, 30)).float() / 255  # 8-bit images as read, not square
    before = torch.get_rng_state()
    got = augmentation("official", 3, 5, 16)(x)
    assert torch.equal(torch.get_rng_state(), before) and got.shape == (12, 3, 16, 16)
    torch.manual_seed(3 * 1000003 + 5)
    pil = [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in x]
    boxes = [crop.get_params(image, crop.scale, crop.ratio) for image in pil]
    cropped = [TVF.to_tensor(TVF.resized_crop(image, *box, list(crop.size), crop.interpolation))
               for image, box in zip(pil, boxes)]
    flip_h, flip_v = torch.rand(2, 12) < 0.5
    colour = v2.Compose([v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4)], p=0.8), v2.RandomGrayscale(p=0.2),
                         v2.RandomApply([v2.GaussianBlur((3, 7), sigma=(0.1, 2.0))], p=0.4)])
    expected = []
    for image, h, v in zip(cropped, flip_h, flip_v):
        image = image.flip(-1) if h else image
        expected.append(colour(image.flip(-2) if v else image))
    assert (got - torch.stack(expected)).abs().max() < 0.02
    plain = C.resize_and_crop(x, 16, "bicubic", (0, 1), "squash")  # no crop: the whole image squashed
    flips_only = augmentation("flip", 3, 5)(plain)
    changed = [(a - b).abs().max() > 0.1 for a, b in zip(got, flips_only)]
    assert 3 <= sum(changed) <= 12  # p 0.8 / 0.2 / 0.4: most images, each its own way
    again = augmentation("official", 3, 5, 16)
    assert again.crops and torch.equal(got, again(x)) and not torch.equal(got, augmentation("official", 3, 6, 16)(x))
    # through clip_input: the images as read reach it, 24 x 30 composites of 8-bit RGB
    raw = (x.permute(0, 2, 3, 1) * 255).round().byte()
    cfg = {"size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    assert torch.equal(C.clip_input(raw, cfg, "cpu", augment=again), (got - 0.5) / 0.5)


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("source", ["generated tifs", "real tifs", "random digital numbers"])
def test_ms_input_matches_a_cpu_reference(tmp_path, source, size):
    if source == "random digital numbers":  # beyond 10000 too, where reflectance is clipped to 1
        images = list(np.random.default_rng(0).integers(0, 65536, (3, 20, 20, 13), dtype=np.uint16))
    else:
        images = [tifffile.imread(f) for f in image_files(source, tmp_path)[0]]
    expected = []
    for image in images:  # reflectance in numpy, then torchvision's bicubic resize, one image at a time
        reflectance = np.clip(image.astype(np.float64) / 10000, 0, 1).astype(np.float32)
        expected.append(TVF.resize(torch.from_numpy(reflectance).permute(2, 0, 1), [size, size],
                                   interpolation=TVF.InterpolationMode.BICUBIC, antialias=True))
    got = C.ms_input(torch.from_numpy(np.stack(images)), size, "cpu")
    assert got.shape == (len(images), 13, size, size)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


# ----------------------------------------------------------------------------- what a new user meets


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    def offline(root, download):  # as torchvision does offline: its folder made, then the fetch fails
        os.makedirs(os.path.join(root, "eurosat"))
        raise OSError("no network")
    monkeypatch.setattr(C.torchvision.datasets, "EuroSAT", offline)
    for root in (tmp_path / "data" / "eurosat", tmp_path):  # a fresh root, and one that was there before
        with pytest.raises(C.UserError, match="could not download EuroSAT.*nothing was kept"):
            C.list_scenes("eurosat", str(root), download=True)
        assert not os.path.exists(tmp_path / "data" / "eurosat") and not os.path.exists(tmp_path / "eurosat")
    with pytest.raises(C.UserError, match=r"does not exist; pass --root DIR, or --download to fetch it"):
        C.list_scenes("eurosat", str(tmp_path / "data" / "eurosat"))  # the next run meets no half-made folder


def test_rgb_images_under_an_ms_data_set_get_a_hint(tmp_path):
    root = make_eurosat_rgb(tmp_path / "rgb", per_class=1, classes=EUROSAT_CLASSES[:2], size=8)
    with pytest.raises(C.UserError, match=r"look like RGB images: pass --data eurosat or --data folder"):
        C.list_scenes("eurosat_ms", os.path.join(root, "eurosat", "2750"))


def test_eurosat_ms_download_unpacks_torchgeos_archive_where_the_data_set_looks(tmp_path, monkeypatch):
    """--download for eurosat_ms: an archive in the real layout (ds/images/.../tif/<Class>/*.tif),
    fetched by URL, its MD5 checked, unpacked under --root, the zip removed; a wrong MD5 keeps nothing."""
    import functools
    import hashlib
    import http.server
    import threading
    import zipfile
    made = make_eurosat_ms(tmp_path / "src" / C.EUROSAT_MS_FOLDER, per_class=2, classes=EUROSAT_CLASSES, size=8)
    archive = tmp_path / "EuroSATallBands.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for folder, _, files in os.walk(tmp_path / "src"):
            for f in files:
                z.write(os.path.join(folder, f), os.path.relpath(os.path.join(folder, f), tmp_path / "src"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/EuroSATallBands.zip"
    root = tmp_path / "data" / "EuroSAT_MS"
    try:
        monkeypatch.setattr(C, "EUROSAT_MS_ARCHIVE", (url, "0" * 32))
        with pytest.raises(C.UserError, match="could not download EuroSAT.*nothing was kept"):
            C.list_scenes("eurosat_ms", str(root), download=True)
        assert not os.path.exists(root)
        monkeypatch.setattr(C, "EUROSAT_MS_ARCHIVE", (url, md5))
        scenes = C.list_scenes("eurosat_ms", str(root), download=True)
    finally:
        server.shutdown()
    assert len(scenes.files) == 20 and scenes.classes == EUROSAT_CLASSES
    assert scenes.root == os.path.join(str(root), C.EUROSAT_MS_FOLDER) and os.listdir(root) == ["ds"]
    assert np.array_equal(C.read_s2_tif(os.path.join(scenes.root, scenes.files[0])),
                          tifffile.imread(os.path.join(made, scenes.files[0])))
    monkeypatch.setattr(C, "EUROSAT_MS_ARCHIVE", (url, md5))  # there already: no fetch (server is down)
    assert C.list_scenes("eurosat_ms", str(root), download=True).files == scenes.files
