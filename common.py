"""What two or more stages of rsclip-align share, in the order the data flows:

  data        class names, prompt templates, file lists, splits, readers, packed cache, batches
  transforms  the RGB composite and each encoder's input, computed on the device
  models      open_clip loading, the zero-shot head and logits, embedding and scoring a split, the student
  runs        one-line errors, atomic writes, run folders, end-of-epoch checkpoints, pictures
"""
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset


class UserError(Exception):
    """Bad input the user can fix: printed as one line naming the file or flag and the fix; exit code 2."""


# ============================================================================ data
#
# A data set is one entry of DATA (below): its modality, default root, lister (files, labels,
# class names), reader, templates, pixel format (bands, RGB constant), official splits and
# multi-label targets. The stages never branch on a data set's name.

# Sentinel-2 band order of the EuroSAT MS GeoTIFFs (B8A comes last): the student's input order.
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
RGB_BANDS = ("B04", "B03", "B02")  # red, green, blue
L1C_RGB_MAX = 3558.0  # L1C digital number shown as grey level 255 in the EuroSAT RGB release
L2A_RGB_MAX = 2000.0  # L2A digital number shown as 255 in the official code's BigEarthNet RGB
REFLECTANCE_SCALE = 1.0 / 10000.0  # digital number -> reflectance (L1C top of atmosphere, L2A surface)
# BigEarthNet-S2 v1.0 stores each L2A band at its own resolution (no B10): 10 m, 20 m, 60 m.
BIGEARTHNET_BANDS = (("B02", "B03", "B04", "B08"), ("B05", "B06", "B07", "B8A", "B11", "B12"), ("B01", "B09"))
BIGEARTHNET_SIZES = (120, 60, 20)  # pixels a side of each group
# BigEarthNet-S1 v1.0: VV and VH backscatter in dB (float32, 120 px), with BigEarthNet's published mean and std.
BIGEARTHNET_S1 = {"VV": (-12.620, 5.116), "VH": (-19.290, 5.464)}
# SEN12MS stores 13 L1C bands, B8A after B08 (the official MTMG config calls it "S2_L2A"; it is L1C, with B10).
SEN12MS_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
SEN12MS_CLASSES = ("forest", "shrubland", "savanna", "grassland", "wetlands", "croplands", "urban / built-up",
                   "snow / ice", "barren", "water")  # the SEN12MS toolbox's simplified IGBP scheme
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bigearthnet")  # official lists

# The CLIP paper's EuroSAT class names and templates, keyed by EuroSAT's folder names.
EUROSAT_CLASSNAMES = {
    "AnnualCrop": "annual crop land", "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings", "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land", "Residential": "residential buildings or homes or apartments",
    "River": "river", "SeaLake": "lake or sea",
}
EUROSAT_TEMPLATES = ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                     "a centered satellite photo of the {}.")
# The CLIP paper's RESISC45 templates; its class names are the folder names with spaces.
RESISC45_TEMPLATES = tuple(f"{view} of {article}{{}}." for article in ("", "a ", "the ")
                           for view in ("satellite imagery", "aerial imagery", "satellite photo",
                                        "aerial photo", "satellite view", "aerial view"))
GENERIC_TEMPLATES = ("a satellite photo of {}.", "a satellite photo of a {}.", "a satellite photo of the {}.")

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}  # without official splits, see hashed_split()
RGB_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
TIF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Pixels:
    """How an 'ms' data set stores its bands: the band names of each stored array (one per
    resolution), and the digital number its RGB composite shows as grey level 255; `sar`: for a
    Sentinel-1 student, each polarisation's dB (mean, std) to z-score it with (None: the student
    reads the 13 Sentinel-2 bands)."""
    bands: tuple
    rgb_max: float
    sar: dict = None

    student_bands = property(lambda self: tuple(self.sar) if self.sar else S2_BANDS)


@dataclass
class Scenes:
    """A list of labelled scenes (image files or patch folders) of one data set."""
    dataset: str
    root: str
    modality: str  # 'rgb' (8-bit images) or 'ms' (Sentinel-2 bands)
    classes: list  # folder or label names
    classnames: list  # names used in the prompts
    templates: tuple
    files: list = field(default_factory=list)  # paths relative to root
    labels: np.ndarray = None  # (N,) class ids, or (N, C) 0/1 targets for multi-label data
    split: str = "all"
    seed: int = None
    official_split: list = None  # each file's split where the data set has official splits
    left_out: dict = field(default_factory=dict)  # reason -> number of scenes on disk not listed
    unusable: dict = field(default_factory=dict)  # file -> reason found while listing (reported when read)

    pixels = property(lambda self: DATA[self.dataset].pixels)
    multilabel = property(lambda self: self.labels is not None and self.labels.ndim == 2)

    def subset(self, indices, split):
        official = None if self.official_split is None else [self.official_split[i] for i in indices]
        return replace(self, files=[self.files[i] for i in indices], labels=self.labels[indices], split=split,
                       official_split=official)


def folder_classname(folder):
    """A prompt-ready name from a folder name: 'baseball_diamond' / 'SeaLake' -> 'baseball diamond' / 'sea lake'."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder).replace("_", " ").replace("-", " ").lower()


def download_eurosat(root):
    """torchvision's EuroSAT download into root/eurosat/2750/; a failed download leaves nothing behind."""
    made = next((p for p in (root, os.path.join(root, "eurosat")) if not os.path.exists(p)), None)
    try:
        torchvision.datasets.EuroSAT(root, download=True)
    except Exception as e:
        if made:  # the outermost folder the download made
            shutil.rmtree(made, ignore_errors=True)
        raise UserError(f"could not download EuroSAT into {root} ({type(e).__name__}: {str(e)[:160]}); nothing "
                        f"was kept; fetch it elsewhere and pass --root DIR holding eurosat/2750/<Class>/*.jpg")


def list_class_folders(dataset, root, download=False, suffixes=RGB_SUFFIXES, classnames=folder_classname,
                       subfolders=(), fetch=None):
    """A class-folder data set: <folder>/<ClassName>/<files>, <folder> the first of `subfolders` under
    root that exists, or root. `classnames`: a dict (folder -> prompt name) or a function of the folder."""
    if download and fetch:
        fetch(root)
    folder = next((os.path.join(root, s) for s in subfolders if os.path.isdir(os.path.join(root, s))), root)
    if not os.path.isdir(folder):
        hint = f" (01_patch_clip.py --data {dataset} --download fetches it)" if fetch else ""
        raise UserError(f"data folder {folder} does not exist; pass --root DIR{hint}")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise UserError(f"{folder} has no class sub-folders; expected {folder}/<ClassName>/<image files>")

    def one_level_up():  # a hint when the data set's folder is a sub-folder of --root
        inner = [os.path.join(folder, c) for c in classes if any(
            os.path.isdir(os.path.join(folder, c, d)) and (not isinstance(classnames, dict) or d in classnames)
            for d in os.listdir(os.path.join(folder, c)))]
        return f"; --root looks one level too high: pass --root {inner[0]}" if inner else ""
    if isinstance(classnames, dict) and any(c not in classnames for c in classes):
        raise UserError(f"{folder} has folders {[c for c in classes if c not in classnames]} that are not "
                        f"{dataset} classes" + (one_level_up() or "; use --data folder"))
    files, labels = [], []
    for label, name in enumerate(classes):
        listed = sorted(os.listdir(os.path.join(folder, name)))
        names = [f for f in listed if f.lower().endswith(suffixes)]
        if not names:
            rgb = [f for f in listed if f.lower().endswith(RGB_SUFFIXES)]
            hint = (f"its files ({rgb[0]}, ...) look like RGB images: pass --data eurosat or --data folder"
                    if rgb else one_level_up()[2:] or "add its images or remove the folder")
            raise UserError(f"class folder {os.path.join(folder, name)} holds no {'/'.join(suffixes)} files "
                            f"for --data {dataset}; {hint}")
        files += [os.path.join(name, f) for f in names]
        labels += [label] * len(names)
    names = [classnames[c] if isinstance(classnames, dict) else classnames(c) for c in classes]
    return dict(root=folder, classes=classes, classnames=names, files=files, labels=np.array(labels, np.int64))


def bigearthnet_nomenclature():
    """The shipped nomenclature.json: 43 label names in index order, 19/5-class names, the 43 -> 19/5 maps."""
    return read_json(os.path.join(SHIPPED, "nomenclature.json"))


def official_splits(folder=SHIPPED):
    """patch name -> 'train'/'val'/'test' from the official BigEarthNet-S2 v1.0 lists (shipped in
    data/bigearthnet/; the seasonal-snow and cloud/shadow patches are not on them)."""
    import bz2
    splits = {}
    for split in ("train", "val", "test"):
        with bz2.open(os.path.join(folder, f"{split}.csv.bz2"), "rt") as f:
            splits.update((line.strip(), split) for line in f if line.strip())
    return splits


def list_bigearthnet(dataset, root, download=False, n_classes=19, s1=False):
    """BigEarthNet-S2 v1.0: root/BigEarthNet-v1.0/<patch>/<patch>_<band>.tif and
    <patch>_labels_metadata.json (or root is that folder). Only patches on the official lists
    are kept; a patch without a label among the `n_classes` is left out; both are counted. With `s1`,
    BigEarthNet-S1 v1.0 (root/BigEarthNet-S1-v1.0/<patch>/<patch>_VV.tif, _VH.tif) beside it: each S1
    patch takes the split of the S2 patch its labels json names (corresponding_s2_patch)."""
    archive = "BigEarthNet-S1-v1.0" if s1 else "BigEarthNet-v1.0"
    folder = next((p for p in (os.path.join(root, archive), root) if os.path.isdir(p)), root)
    if not os.path.isdir(folder):
        raise UserError(f"data folder {root} does not exist; pass --root DIR holding {archive}/<patch folders>")
    entries = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if (os.path.exists(os.path.join(root, "metadata.parquet")) or "BigEarthNet-S2" in entries
            or any(re.search(r"_N\d{4}_R\d{3}_T\w{5}$", d) for d in entries[:50])):
        raise UserError(f"{root} looks like BigEarthNet v2.0 (reBEN), which this project does not read; "
                        f"pass --root DIR of the BigEarthNet-S2 v1.0 archive (BigEarthNet-v1.0/<patch folders>)")
    nomenclature = bigearthnet_nomenclature()
    index43 = {name: i for i, name in enumerate(nomenclature["labels43"])}
    classes = nomenclature[f"labels{n_classes}"]
    mapping = {int(k): v for k, v in nomenclature.get(f"map43to{n_classes}", {i: i for i in range(43)}).items()}
    split_of = official_splits()
    files, splits, targets, left_out, unusable = [], [], [], {}, {}
    for name in entries:
        if not s1 and name not in split_of:
            reason = "not on the official lists (seasonal snow, cloud or shadow, or not BigEarthNet-S2 v1.0)"
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        target, key = np.zeros(len(classes), np.uint8), name
        path = os.path.join(folder, name, f"{name}_labels_metadata.json")
        try:
            with open(path) as f:
                meta = json.load(f)
            key = meta["corresponding_s2_patch"] if s1 else name  # an S1 patch: its S2 partner's split
            unknown = [n for n in meta["labels"] if n not in index43]
            if unknown:
                raise ValueError(f"has label {unknown[0]!r}, not a BigEarthNet-v1.0 (43-class) name")
            target[[mapping[index43[n]] for n in meta["labels"] if index43[n] in mapping]] = 1
        except (OSError, ValueError, KeyError, TypeError) as e:
            unusable[name] = f"{path}: {e}" if isinstance(e, ValueError) and "label" in str(e) else \
                f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]})"
        if key not in split_of:  # (S1) its partner is off the lists, or its json cannot say which it is
            reason = "whose Sentinel-2 partner is not on the official lists, or not named"
            left_out[reason] = left_out.get(reason, 0) + 1
        elif not target.any() and name not in unusable:
            reason = f"with no label among the {n_classes} classes"
            left_out[reason] = left_out.get(reason, 0) + 1
        else:
            files.append(name)
            splits.append(split_of[key])
            targets.append(target)
    if not files:
        raise UserError(f"{folder} holds no {'BigEarthNet-S1' if s1 else 'BigEarthNet-S2'} v1.0 patch folders of the official splits "
                        f"({', '.join(f'{n} {r}' for r, n in left_out.items()) or 'no sub-folders'}); "
                        f"pass --root DIR holding {archive}/<patch>/<patch>_<band>.tif, ...")
    return dict(root=folder, classes=classes, classnames=[c.lower() for c in classes], files=files,
                labels=np.stack(targets), official_split=splits, left_out=left_out, unusable=unusable)


def read_bigearthnet_s1(folder):
    """A BigEarthNet-S1 v1.0 patch folder and its Sentinel-2 partner (BigEarthNet-v1.0/<partner>/
    beside the S1 archive): the partner's three uint16 arrays (read_bigearthnet) and the S1 patch's
    (120, 120, 2) float32 VV, VH in dB, as stored."""
    name = os.path.basename(folder.rstrip(os.sep))
    with open(os.path.join(folder, f"{name}_labels_metadata.json")) as f:
        partner = json.load(f)["corresponding_s2_patch"]
    s2 = os.path.join(os.path.dirname(os.path.dirname(folder.rstrip(os.sep))), "BigEarthNet-v1.0", partner)
    if not os.path.isdir(s2):
        raise ValueError(f"has no Sentinel-2 partner: {partner} ({s2}) does not exist")
    sar = []
    for band in BIGEARTHNET_S1:
        path = os.path.join(folder, f"{name}_{band}.tif")
        image = read_tif(path) if os.path.isfile(path) else None
        if image is None or image.shape != (120, 120) or image.dtype != np.float32:
            raise ValueError(f"band {path} is " + ("missing" if image is None else f"{image.dtype} {image.shape}")
                             + ", expected float32 (120, 120) dB")
        sar.append(image)
    return (*read_bigearthnet(s2), np.stack(sar, axis=-1))


def sen12ms_targets(shares, threshold=0.1):
    """The SEN12MS toolbox's 10 simplified IGBP classes from a patch's 17 IGBP shares p:
    [p0+..+p4, p5+p6, p7+p8, p9, p10, p11+p13, p12, p14, p15, p16]; a class is present where its share is
    >= threshold (the toolbox's 0.1)."""
    p = np.asarray(shares, np.float64)
    simplified = [p[0:5].sum(), p[5:7].sum(), p[7:9].sum(), p[9], p[10], p[11] + p[13], p[12], p[14], p[15], p[16]]
    return (np.array(simplified) >= threshold).astype(np.uint8)


def list_sen12ms(dataset, root, download=False, threshold=0.1, val_fraction=0.1):
    """SEN12MS: root/ROIs<id>_<season>/s2_<scene>/ROIs<id>_<season>_s2_<scene>_p<patch>.tif, with the
    toolbox's label file and official split lists beside them (IGBP_probability_labels.pkl, train_list.txt,
    test_list.txt). There is no official val list: val is the train-list scenes (s2_<scene> folders, whole)
    whose SHA-256("0/<season>/<scene>") falls in the first `val_fraction`. Listed patches missing on disk
    are left out and counted."""
    import pickle
    need = [os.path.join(root, f) for f in ("IGBP_probability_labels.pkl", "train_list.txt", "test_list.txt")]
    if not all(map(os.path.isfile, need)):
        raise UserError(f"{next(p for p in need if not os.path.isfile(p))} does not exist; --data {dataset} reads "
                        f"the ROIs*/s2_*/ folders and, beside them, the label file and split lists of the SEN12MS "
                        f"toolbox (github.com/schmitt-muc/SEN12MS: labels/, splits/)")
    with open(need[0], "rb") as f:
        shares = pickle.load(f)  # the toolbox's file: patch id -> 17 IGBP shares
    files, splits, targets, left_out = [], [], [], {}
    for split, path in zip(("train", "test"), need[1:]):
        with open(path) as f:
            for pid in sorted(line.strip() for line in f if line.strip()):
                season, scene = pid.split("_s2_")[0], "s2_" + pid.split("_s2_")[1].rsplit("_p", 1)[0]
                if not os.path.isfile(os.path.join(root, season, scene, pid)):
                    left_out["listed but not on disk"] = left_out.get("listed but not on disk", 0) + 1
                    continue
                held = split == "train" and scene_hash(0, f"{season}/{scene}") / 2 ** 64 < val_fraction
                files.append(os.path.join(season, scene, pid))
                splits.append("val" if held else split)
                targets.append(sen12ms_targets(shares[pid], threshold))
    if not files:
        raise UserError(f"{root} holds none of the patches on its split lists; pass --root DIR holding ROIs*/s2_*/*.tif")
    return dict(root=root, classes=list(SEN12MS_CLASSES), classnames=list(SEN12MS_CLASSES), files=files,
                labels=np.stack(targets), official_split=splits, left_out=left_out)


def imagenet_prompts():
    """ImageNet's class names and the CLIP paper's 80 templates as open_clip ships them, keyed by the
    ILSVRC-2012 synset ids in their standard (sorted) order as timm ships them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo
    synsets = ImageNetInfo().label_names()
    assert len(synsets) == len(IMAGENET_CLASSNAMES) == 1000 and synsets == sorted(synsets)
    return dict(zip(synsets, IMAGENET_CLASSNAMES)), tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def list_imagenet(dataset, root, download=False):
    """The ILSVRC-2012 validation set, one folder per synset (n01440764/*.JPEG, ...; any subset of the
    1000), as torchvision's ImageFolder reads it: the test split of every published zero-shot figure."""
    names, _ = imagenet_prompts()
    folder = next((p for p in (os.path.join(root, "val"), root) if os.path.isdir(p)), root)
    unknown = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and d not in names) \
        if os.path.isdir(folder) else []
    if unknown:
        raise UserError(f"{os.path.join(folder, unknown[0])} is not an ILSVRC-2012 synset folder"
                        + (f" (nor {len(unknown) - 1} more)" if len(unknown) > 1 else "") + "; --data imagenet reads "
                        "the validation set as <root>/<synset id, e.g. n01440764>/<images> (--data folder reads others)")
    listed = list_class_folders(dataset, folder, classnames=names)
    return {**listed, "official_split": ["test"] * len(listed["files"])}


def read_rgb(path):
    """An 8-bit image as uint8 (H, W, 3), read with PIL."""
    from PIL import Image
    try:
        with quietly(Image.open, path, logger="PIL") as image:  # PIL logs the reason said below, once per file
            return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants
    except Exception as e:
        tif = path.lower().endswith(TIF_SUFFIXES)
        raise ValueError(f"cannot decode image ({type(e).__name__}: {str(e)[:160]})" + (
            "; a Sentinel-2 GeoTIFF? pass --data eurosat_ms (or another Sentinel-2 data set)" if tif else ""))


def read_tif(path):
    """A GeoTIFF as a numpy array (tifffile); ValueError with the reason when it cannot be read."""
    try:
        return quietly(tifffile.imread, path, logger="tifffile")  # its log lines would repeat the reason below
    except Exception as e:
        raise ValueError(f"cannot read GeoTIFF ({type(e).__name__}: {e})")


def read_s2_tif(path):
    """A 13-band Sentinel-2 tif as uint16 (H, W, 13) as stored (EuroSAT MS: S2_BANDS order; SEN12MS's
    bands-first tifs: SEN12MS_BANDS order)."""
    image = read_tif(path)
    if image.ndim == 3 and image.shape[0] == len(S2_BANDS) and image.shape[-1] != len(S2_BANDS):
        image = image.transpose(1, 2, 0)  # bands-first tif
    if image.ndim != 3 or image.shape[-1] != len(S2_BANDS):
        raise ValueError(f"has shape {image.shape}, expected (H, W, {len(S2_BANDS)}) Sentinel-2 bands")
    if image.dtype != np.uint16:
        raise ValueError(f"has dtype {image.dtype}, expected uint16 L1C digital numbers")
    return image


def read_bigearthnet(folder):
    """A BigEarthNet-S2 v1.0 patch folder as three uint16 arrays, one per resolution, channels
    last, in BIGEARTHNET_BANDS order: (120, 120, 4), (60, 60, 6), (20, 20, 2)."""
    name = os.path.basename(folder.rstrip(os.sep))
    groups = []
    for bands, size in zip(BIGEARTHNET_BANDS, BIGEARTHNET_SIZES):
        group = []
        for band in bands:
            path = os.path.join(folder, f"{name}_{band}.tif")
            if not os.path.isfile(path):
                raise ValueError(f"lacks its band {band} ({path} does not exist)")
            try:
                image = read_tif(path)
            except ValueError as e:
                raise ValueError(f"has a band that {path} {e}")
            if image.shape != (size, size) or image.dtype != np.uint16:
                raise ValueError(f"band {path} is {image.dtype} {image.shape}, expected uint16 ({size}, {size})")
            group.append(image)
        groups.append(np.stack(group, axis=-1))
    return tuple(groups)


@dataclass(frozen=True)
class DataSet:
    """One entry of DATA: what the stages know about a data set."""
    modality: str  # 'rgb': 8-bit images; 'ms': Sentinel-2 bands (CLIP sees their RGB composite)
    root: str  # default --root (None: --root is required)
    lister: object  # (name, root, download) -> Scenes fields: root, files, labels, classes, classnames, ...
    reader: object  # path -> uint8 (H, W, 3), or a tuple of uint16 (h, w, bands) arrays as in pixels.bands
    templates: tuple
    pixels: Pixels = None  # 'ms' only: the stored bands and the RGB composite's constant
    official_splits: bool = False  # False: hashed_split of the scene ids
    multilabel: bool = False  # (N, C) 0/1 targets: binary cross-entropy and mean average precision
    scenes: str = None  # the scenes its files show, shared by entries that are one set of scenes in other
    #                     bands or classes (EuroSAT's jpgs and tifs); None: the data set's own folder


def _folders(**kw):
    return lambda name, root, download: list_class_folders(name, root, download, **kw)


def _bigearthnet(n_classes):
    return DataSet("ms", "data/BigEarthNet-v1.0",
                   lambda name, root, download: list_bigearthnet(name, root, download, n_classes),
                   read_bigearthnet, GENERIC_TEMPLATES, Pixels(BIGEARTHNET_BANDS, L2A_RGB_MAX),
                   official_splits=True, multilabel=True, scenes="bigearthnet")


def _bigearthnet_s1(n_classes):
    return DataSet("ms", "data", lambda name, root, download: list_bigearthnet(name, root, download, n_classes, True),
                   read_bigearthnet_s1, GENERIC_TEMPLATES,
                   Pixels((*BIGEARTHNET_BANDS, tuple(BIGEARTHNET_S1)), L2A_RGB_MAX, sar=BIGEARTHNET_S1),
                   official_splits=True, multilabel=True, scenes="bigearthnet")


DATA = {
    "eurosat": DataSet("rgb", "data/eurosat", _folders(classnames=EUROSAT_CLASSNAMES, fetch=download_eurosat,
                                                       subfolders=(os.path.join("eurosat", "2750"), "2750")),
                       read_rgb, EUROSAT_TEMPLATES, scenes="eurosat"),
    "eurosat_ms": DataSet("ms", "data/EuroSAT_MS", _folders(classnames=EUROSAT_CLASSNAMES, suffixes=TIF_SUFFIXES),
                          read_s2_tif, EUROSAT_TEMPLATES, Pixels((S2_BANDS,), L1C_RGB_MAX), scenes="eurosat"),
    "resisc45": DataSet("rgb", "data/NWPU-RESISC45", _folders(classnames=lambda c: c.replace("_", " ")),
                        read_rgb, RESISC45_TEMPLATES),
    "folder": DataSet("rgb", None, _folders(), read_rgb, GENERIC_TEMPLATES),
    "imagenet": DataSet("rgb", None, list_imagenet, read_rgb, None, official_splits=True),  # templates: open_clip's
    "bigearthnet19": _bigearthnet(19),
    "bigearthnet43": _bigearthnet(43),
    "bigearthnet5": _bigearthnet(5),
    "bigearthnet19_s1": _bigearthnet_s1(19),
    "sen12ms": DataSet("ms", "data/SEN12MS", list_sen12ms, read_s2_tif, GENERIC_TEMPLATES,
                       Pixels((SEN12MS_BANDS,), L1C_RGB_MAX), official_splits=True, multilabel=True),
}
MS_DATASETS = tuple(name for name, entry in DATA.items() if entry.modality == "ms")


def list_scenes(dataset, root=None, download=False):
    """All labelled scenes of a data set, with the official split of each where it has one."""
    if dataset not in DATA:
        raise UserError(f"unknown --data '{dataset}'; choose one of {', '.join(DATA)}")
    entry = DATA[dataset]
    root = root or entry.root
    if root is None:
        raise UserError(f"--data {dataset} needs its folder: --root DIR (or --data {dataset}=DIR), a folder with one "
                        f"sub-folder of images per class")
    listed = entry.lister(dataset, root, download)
    templates = entry.templates if entry.templates is not None else imagenet_prompts()[1]
    return Scenes(dataset, modality=entry.modality, templates=templates, **listed)


def scene_set(dataset, root):
    """Which scenes a data set shows: 'eurosat' (its jpgs and tifs), 'bigearthnet', else the folder's real path."""
    return DATA[dataset].scenes or os.path.realpath(root)


def scene_id(file):
    """A scene's id: its path below the data root without extension (a jpg and a tif of one scene share it)."""
    return os.path.splitext(file)[0].replace(os.sep, "/")


def scene_hash(seed, scene):
    """A scene's draw for a seed: the first 8 bytes of SHA-256("<seed>/<scene id>"), an integer."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{scene}".encode()).digest()[:8], "big")


def hashed_split(ids, seed):
    """The split of each scene from its id and the seed alone: u = scene_hash / 2^64, train if
    u < 0.7, val if u < 0.8, else test (SPLIT_FRACTIONS). Adding or removing files never moves
    another scene; the fractions hold in expectation (not exactly per class)."""
    cuts = np.cumsum(list(SPLIT_FRACTIONS.values()))
    u = np.array([scene_hash(seed, i) / 2 ** 64 for i in ids])
    return [list(SPLIT_FRACTIONS)[k] for k in np.searchsorted(cuts, u, side="right")]


def split_indices(scenes, seed):
    """{'train', 'val', 'test'} -> sorted indices of the scenes: official splits, else hashed_split()."""
    names = np.array(scenes.official_split or hashed_split([scene_id(f) for f in scenes.files], seed))
    return {split: np.flatnonzero(names == split) for split in SPLIT_FRACTIONS}


def take_split(scenes, split, seed):
    """One split ('train', 'val', 'test', or 'all' of them) of listed scenes."""
    return replace(scenes if split == "all" else scenes.subset(split_indices(scenes, seed)[split], split), seed=seed)


def load_split(dataset, root, split, seed, download=False):
    """The scenes of one split ('train', 'val', 'test', or 'all' of them) of a data set."""
    return take_split(list_scenes(dataset, root, download), split, seed)


def left_out_note(scenes):
    """'; left out 57 scenes with no label among the 19 classes, ...' or ''."""
    notes = ", ".join(f"{n} scenes {reason}" for reason, n in scenes.left_out.items())
    return f"; left out {notes}" if notes else ""


def read_scenes(path, sha256):
    """The scene ids of a stage-1 train_scenes.txt, checked against the hash its patched.json records."""
    if not os.path.isfile(path) or sha256_of(path) != sha256:
        raise UserError(f"{path} is missing or differs from the training scenes its checkpoint recorded; "
                        f"restore it from the run folder, or re-run the stage that wrote it")
    with open(path) as f:
        return set(f.read().split())


def check_held_out(scenes, trained, what):
    """Refuse to evaluate or validate on scenes that `what` was trained on (a set of scene ids)."""
    seen = [f for f in scenes.files if scene_id(f) in trained]
    if seen:
        raise UserError(f"{len(seen)} of the {len(scenes.files)} {scenes.split} scenes of {scenes.root} were "
                        f"training scenes of {what} (e.g. {seen[0]}): the data changed or another split was "
                        f"chosen; evaluate on the data and split seed it was trained with")


class ImageList(list):
    """A batch of 8-bit images of several sizes: a list of (H, W, 3) tensors (see clip_input)."""


def parts(image):
    """A stored image as a tuple of arrays (one per resolution; a single array for most data sets)."""
    return tuple(image) if isinstance(image, (tuple, list)) and not isinstance(image, ImageList) else (image,)


def stack(images, shape, dtype):
    """Arrays of one kind as a batch: one tensor, or for 8-bit images of several sizes an ImageList."""
    if not images:
        return torch.from_numpy(np.zeros((0, *shape), dtype))
    if all(image.shape == images[0].shape for image in images):
        return torch.from_numpy(np.stack(images))
    return ImageList(torch.from_numpy(np.array(image)) for image in images)


class ImageFiles(Dataset):
    """`dataset[indices]`: a batch of raw images stacked channels-last as stored (uint8 RGB, uint16
    MS; a tuple of stacks, one per resolution, for BigEarthNet), their labels and indices, and `bad`
    (path, reason) files (see batch_loader). Sentinel-2 images share the first file's size (a file of
    another size is bad); 8-bit RGB images of several sizes come as an ImageList."""

    def __init__(self, scenes, skip_bad_files=False):
        self.scenes, self.skip_bad_files, self.skipped = scenes, skip_bad_files, {}
        self.read = DATA[scenes.dataset].reader
        if not scenes.files:
            why = (f"none of its scenes are on the official {scenes.split} list" if scenes.official_split is not None
                   else f"about {SPLIT_FRACTIONS.get(scenes.split, 1):.0%} of the scenes fall in it")
            raise UserError(f"the {scenes.split} split of {scenes.root} is empty ({why}); add images")
        reasons = []
        for name in scenes.files:  # the first readable file sets the size; bad ones are reported per batch
            try:
                first = parts(self.read_one(name))
                break
            except ValueError as e:
                reasons.append(f"{os.path.join(scenes.root, name)} {e}")
        else:
            raise UserError(f"none of the {len(reasons)} {scenes.split} files can be read, e.g. {reasons[0]}")
        self.shapes, self.dtypes = [p.shape for p in first], [p.dtype for p in first]

    def read_one(self, name):
        if name in self.scenes.unusable:
            raise ValueError(self.scenes.unusable[name])
        return self.read(os.path.join(self.scenes.root, name))

    def __len__(self):
        return len(self.scenes.files)

    def __getitem__(self, indices):
        images, kept, bad = [], [], []
        for i in indices:
            try:
                image = parts(self.read_one(self.scenes.files[i]))
                if self.scenes.modality == "ms" and [p.shape for p in image] != self.shapes:
                    raise ValueError(f"has shape {image[0].shape}, the others have {self.shapes[0]}")
            except ValueError as e:
                bad.append((os.path.join(self.scenes.root, self.scenes.files[i]), str(e)))
                continue
            images.append(image)
            kept.append(i)
        kept = np.array(kept, np.int64)
        stacks = [stack([im[k] for im in images], shape, dtype) for k, (shape, dtype) in enumerate(zip(self.shapes,
                                                                                                    self.dtypes))]
        return {"images": stacks[0] if len(stacks) == 1 else tuple(stacks),
                "labels": torch.from_numpy(self.scenes.labels[kept]), "index": torch.from_numpy(kept), "bad": bad}


class PackedImages(Dataset):
    """The batches of ImageFiles, sliced from a pack (see open_images): per stored array, the images'
    bytes one after another (images.bin, memory-mapped) and their shapes (shapes.npy)."""

    def __init__(self, folder, scenes):
        self.scenes, self.skipped, self.parts = scenes, {}, []  # a pack holds no bad files
        for k, dtype in enumerate(read_json(os.path.join(folder, "files.json"))["dtypes"]):
            shapes = np.load(os.path.join(folder, f"shapes{k or ''}.npy"))
            flat = np.memmap(os.path.join(folder, f"images{k or ''}.bin"), dtype, mode="r")
            ends = np.cumsum(np.prod(shapes, axis=1))
            self.parts.append(flat.reshape(len(shapes), *shapes[0]) if (shapes == shapes[0]).all() else
                              (flat, shapes, ends - np.prod(shapes, axis=1), ends))  # images of several sizes

    def __len__(self):
        return len(self.scenes.files)

    def __getitem__(self, indices):
        indices = np.asarray(indices, np.int64)
        # one copy out of the page cache (np.take: 3-6x faster here than fancy indexing into a new array)
        stacks = [torch.from_numpy(np.asarray(np.take(part, indices, axis=0))) if isinstance(part, np.ndarray) else
                  stack([part[0][part[2][i]:part[3][i]].reshape(part[1][i]) for i in indices], None, None)
                  for part in self.parts]
        return {"images": stacks[0] if len(stacks) == 1 else tuple(stacks),
                "labels": torch.from_numpy(self.scenes.labels[indices]), "index": torch.from_numpy(indices), "bad": []}


def sha256_of(obj_or_path, chunk=1 << 20):
    """Hex SHA-256 of a file's bytes, or of a JSON-serialisable value."""
    h = hashlib.sha256()
    if isinstance(obj_or_path, str) and os.path.isfile(obj_or_path):
        with open(obj_or_path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    else:
        h.update(json.dumps(obj_or_path, sort_keys=True).encode())
    return h.hexdigest()


def scenes_key(scenes):
    """What identifies a split's images: the data root, split, seed and file list (and the pack's format)."""
    return {"root": os.path.abspath(scenes.root), "dataset": scenes.dataset, "split": scenes.split,
            "seed": scenes.seed, "files_sha256": sha256_of(scenes.files), "pack": 2}


def open_images(scenes, cache=None, workers=0, skip_bad_files=False):
    """The dataset of a split: ImageFiles, or with `cache` a PackedImages packed once into
    cache/packed-<hash of scenes_key>/ and memory-mapped after: each image's bytes as read, whatever
    its size. A run packs into a folder of its own and renames it into place whole: runs sharing a
    cache never see half a pack (the later uses the earlier one's). A pack holds the whole split: a
    bad file stops it, --skip-bad-files or not."""
    files = ImageFiles(scenes, skip_bad_files)
    if not cache:
        return files
    folder = os.path.join(cache, "packed-" + sha256_of(scenes_key(scenes))[:16])
    if not os.path.isdir(folder):
        print(f"packing {len(files)} {scenes.split} images into {folder}")
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache, prefix=os.path.basename(folder) + ".tmp")
        try:
            shapes = [[] for _ in files.shapes]
            streams = [open(os.path.join(tmp, f"images{k or ''}.bin"), "wb") for k in range(len(shapes))]
            files.skip_bad_files = False
            for batch in batch_loader(files, 512, workers=workers, hint="drop --cache to use --skip-bad-files"):
                for stream, shape, images in zip(streams, shapes, parts(batch["images"])):
                    for image in images:  # in the split's order (the loader keeps it)
                        stream.write(image.numpy().tobytes())
                        shape.append(image.shape)
            for k, stream in enumerate(streams):
                stream.close()
                np.save(os.path.join(tmp, f"shapes{k or ''}.npy"), np.array(shapes[k], np.int64))
            np.save(os.path.join(tmp, "labels.npy"), scenes.labels)
            write_json(os.path.join(tmp, "files.json"), {**scenes_key(scenes), "files": scenes.files,
                                                         "dtypes": [str(d) for d in files.dtypes]})
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; give the pack the usual permissions
            os.rename(tmp, folder)  # fails when another run's pack got there first: that one is used
        except OSError:
            if not os.path.isdir(folder):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PackedImages(folder, scenes)


def training_batches(n, batch_size):
    """Batches an epoch of n images gives in training: a last batch of a single image is left out,
    since BatchNorm (ResNet CLIPs, CNN students) cannot train on one image."""
    return n // batch_size + (n % batch_size > 1)


def batch_loader(dataset, batch_size, train=False, shuffle=True, seed=0, epoch=0, workers=0, desc=None, hint=None):
    """The batches of a dataset in its order, a progress bar `desc` on a terminal. In training (`train`):
    training_batches() batches, and (with `shuffle`) epoch e's order a permutation drawn from seed and
    e alone (a resumed run sees the same batches). A file that cannot be read stops the run in one line
    naming it, or with the dataset's skip_bad_files is left out and listed in dataset.skipped."""
    from tqdm import tqdm
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist() \
        if train and shuffle else list(range(n))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if train:
        batches = batches[:training_batches(n, batch_size)]
    if isinstance(dataset, PackedImages):  # a batch from a memory map is one copy: worker processes would only
        workers = 0                          # add another, through shared memory
    loader = DataLoader(dataset, batch_size=None, sampler=batches, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers > 0 else None)
    for batch in tqdm(loader, desc=desc, leave=False, disable=desc is None or not sys.stderr.isatty()):
        for path, reason in batch.pop("bad"):
            if not getattr(dataset, "skip_bad_files", False):
                raise UserError(f"{path} {reason}; replace or delete the file, or {hint or 'pass --skip-bad-files'}")
            dataset.skipped[path] = reason
        if len(batch["index"]):
            yield batch


# ============================================================================ transforms


def s2_bands(raw, pixels, device):
    """Sentinel-2 digital numbers on one grid in the student's band order (S2_BANDS), on the device.
    raw: a (B, h, w, bands) uint16 batch, or a tuple of them, one per resolution (BigEarthNet),
    with the band names `pixels.bands`; each is brought to the finest grid with bilinear
    interpolation (as torchgeo's BigEarthNet, which reads with rasterio's bilinear resampling);
    bands the data lacks (B10 in L2A) are zeros, as in the official code. -> (B, 13, H, W) float."""
    arrays = [a.to(device, non_blocking=True).permute(0, 3, 1, 2).float() for a in parts(raw)]
    if len(arrays) == 1 and tuple(pixels.bands[0]) == S2_BANDS:
        return arrays[0]
    grid = max((a.shape[-2:] for a in arrays), key=lambda s: s[0] * s[1])
    out = arrays[0].new_zeros((len(arrays[0]), len(S2_BANDS), *grid))
    for a, bands in zip(arrays, pixels.bands):
        if bands[0] not in S2_BANDS:  # a Sentinel-1 partner's polarisations
            continue
        if a.shape[-2:] != grid:
            a = F.interpolate(a, size=tuple(grid), mode="bilinear", align_corners=False)
        out[:, [S2_BANDS.index(b) for b in bands]] = a
    return out


def rgb_composite(ms, rgb_max):
    """The RGB composite of Sentinel-2 digital numbers: bands B04, B03, B02 times 255/rgb_max,
    clipped to [0, 255] and truncated to whole grey levels (as the uint8 EuroSAT RGB release;
    rgb_max is the data set's: 3558 for L1C, 2000 for L2A as the official BigEarthNet code).
    ms: (B, 13, H, W) float in S2_BANDS order -> (B, 3, H, W) float with values 0..255."""
    rgb = ms[:, [S2_BANDS.index(b) for b in RGB_BANDS]]
    # times 255, then / rgb_max: exact in float32 for uint16 input (* (255 / 3558) gives 254.99998 at 3558)
    return torch.floor(torch.clamp(rgb * 255.0 / rgb_max, 0, 255))


def resize_and_crop(x, size, interpolation, clip_to=None, resize_mode="shortest"):
    """open_clip's resize modes on a batch, to `size` (int or (height, width)): 'shortest' scales the
    shorter side to fit and centre-crops, 'longest' scales the longer side to fit and pads with 0
    (black), 'squash' resizes to the size as it is. With `clip_to` (low, high), resample as PIL does
    8-bit images in open_clip's own preprocessing: width first, then height, clipping each pass
    (bicubic overshoots the range next to sharp edges)."""
    mode = TF.InterpolationMode(interpolation)
    target = (size, size) if isinstance(size, int) else tuple(size)
    h, w = x.shape[-2:]
    if (h, w) == target:
        return x
    if resize_mode == "squash":
        new_h, new_w = target
    elif target[0] == target[1] and resize_mode == "shortest":  # torchvision's Resize(int), as open_clip
        new_h, new_w = (target[0], int(target[0] * w / h)) if h <= w else (int(target[0] * h / w), target[0])
    else:
        scale = (max if resize_mode == "shortest" else min)(target[0] / h, target[1] / w)
        new_h, new_w = round(h * scale), round(w * scale)
    if clip_to is None:
        x = TF.resize(x, [new_h, new_w], interpolation=mode, antialias=True)
    else:
        x = TF.resize(x, [h, new_w], interpolation=mode, antialias=True).clamp(*clip_to)
        x = TF.resize(x, [new_h, new_w], interpolation=mode, antialias=True).clamp(*clip_to)
    return TF.center_crop(x, list(target))  # crops, or pads with 0 where the image is smaller


def clip_pixels(raw, preprocess_cfg, device, pixels=None):
    """A raw batch as CLIP's pixels in [0, 1], on the device: 8-bit RGB (B, H, W, 3) as is, or
    Sentinel-2 bands (`pixels`: the data set's format, see s2_bands) through rgb_composite() with
    the data set's constant; then /255, and open_clip's resize and centre crop."""
    if pixels is None:
        x = raw.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        assert x.shape[1] == 3, "Sentinel-2 bands need their data set's pixels= (bands, RGB constant)"
    else:
        x = rgb_composite(s2_bands(raw, pixels, device), pixels.rgb_max)
    return resize_and_crop(x / 255.0, preprocess_cfg["size"], preprocess_cfg["interpolation"], clip_to=(0, 1),
                           resize_mode=preprocess_cfg.get("resize_mode", "shortest"))


def clip_input(raw, preprocess_cfg, device, pixels=None, augment=None):
    """CLIP's input from a raw batch (see clip_pixels; 8-bit images of several sizes, an ImageList:
    each resized and cropped alone, as open_clip's transform does), an optional `augment` (a
    function of the [0, 1] batch), then normalisation with the model's mean and std. `preprocess_cfg`
    is the model's own (model.visual.preprocess_cfg): size (int for ResNets, (h, w) for ViTs), resize
    mode, interpolation, mean and std, as open_clip's validation transform uses them."""
    if isinstance(raw, ImageList):
        x = torch.cat([clip_pixels(image[None], preprocess_cfg, device) for image in raw])
    else:
        x = clip_pixels(raw, preprocess_cfg, device, pixels)
    if augment is not None:
        x = augment(x)
    return TF.normalize(x, list(preprocess_cfg["mean"]), list(preprocess_cfg["std"]))


def ms_input(raw, size, device, pixels=None):
    """The student's input from a raw batch, on the device: the 13 Sentinel-2 bands on one grid
    (s2_bands; `pixels` None: EuroSAT's (B, H, W, 13) uint16) as reflectance (digital number / 10000,
    clipped to [0, 1]); or, for a Sentinel-1 student (pixels.sar), its polarisations' dB z-scored,
    (dB - mean) / std, as float (never cast to integers); bicubic resize to the student's input size."""
    pixels = pixels or Pixels((S2_BANDS,), None)
    if pixels.sar:
        k = next(k for k, bands in enumerate(pixels.bands) if bands == tuple(pixels.sar))
        x = parts(raw)[k].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        mean, std = (torch.tensor(v, device=device)[:, None, None] for v in zip(*pixels.sar.values()))
        x = (x - mean) / std
    else:
        x = torch.clamp(s2_bands(raw, pixels, device) * REFLECTANCE_SCALE, 0, 1)
    return resize_and_crop(x, size, "bicubic")


# ============================================================================ models


def pick_device(name=None):
    """--device, or CUDA when there is one."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name} is not a torch device; pass cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU; drop --device or pass cpu")
    return device


def autocast(device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's own folder format (save_for_hf, "local-dir:")
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def load_clip(model_name, pretrained, device="cpu"):
    """An open_clip CLIP, its tokenizer and its model config. Its preprocessing is
    model.visual.preprocess_cfg (size, mean/std, interpolation, resize mode), which every stage reads.
    model_name: an open_clip name ('ViT-B-32', 'RN50', ...) or 'local-dir:FOLDER' (open_clip's own
    folder format, as stage 1 writes it). pretrained: an open_clip tag ('openai', ...), a weights
    file, or 'none'. A tag brings its preprocessing and, for OpenAI's weights, QuickGELU."""
    import open_clip
    if model_name.startswith("local-dir:"):
        if not os.path.isfile(os.path.join(model_name[len("local-dir:"):], OPEN_CLIP_CONFIG)):
            raise UserError(f"--model {model_name}: the folder holds no {OPEN_CLIP_CONFIG}; pass a folder written by "
                            f"01_patch_clip.py or open_clip's save_for_hf")
        model = quietly(open_clip.create_model_and_transforms, model_name, device=device)[0]
        return model, open_clip.get_tokenizer(model_name), open_clip.get_model_config(model_name)
    if model_name not in open_clip.list_models():
        raise UserError(f"--model {model_name} is not an open_clip model; see open_clip.list_models()")
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained != "none" else {}
    if pretrained != "none" and not tag and not os.path.isfile(pretrained):
        raise UserError(f"--pretrained {pretrained} is neither a file nor an open_clip tag of {model_name}; "
                        f"tags: {open_clip.list_pretrained_tags_by_model(model_name)}")
    weights = None if pretrained == "none" else tag_weights(model_name, pretrained, tag) if tag else pretrained
    from_tag = {"force_quick_gelu": bool(tag.get("quick_gelu")), "image_mean": tag.get("mean"),
                "image_std": tag.get("std"), "image_interpolation": tag.get("interpolation"),
                "image_resize_mode": tag.get("resize_mode")}
    try:
        model = quietly(open_clip.create_model_and_transforms, model_name, pretrained=weights, device=device,
                        **from_tag)[0]
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if "PytorchStreamReader" in first or "zip archive" in first or "header" in first:
            raise UserError(f"--pretrained {weights} cannot be read (truncated, or not a checkpoint file); "
                            f"download or save it again")
        raise UserError(f"--pretrained {weights} does not fit {model_name} ({first}); pass the --model it was saved from")
    config = {**open_clip.get_model_config(model_name), **({"quick_gelu": True} if from_tag["force_quick_gelu"] else {})}
    return model, open_clip.get_tokenizer(model_name), config


def quietly(fn, *args, logger=None, **kwargs):
    """Call fn without its log's warnings (open_clip's 'No pretrained weights loaded' for --pretrained none)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return fn(*args, **kwargs)
    finally:
        log.setLevel(level)


def tag_weights(model_name, tag_name, tag):
    """The local file of an open_clip tag's weights: cached, else downloaded. Offline and not cached:
    one line within seconds (the hub client would retry for about a minute)."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, download_pretrained
    hub, url = tag.get("hf_hub", ""), tag.get("url", "")
    repo, filename = os.path.split(hub)
    cached = [huggingface_hub.try_to_load_from_cache(repo, name) for name in
              ([filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME])] if hub else \
        [os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))]
    found = [tag["file"]] if tag.get("file") else [c for c in cached if isinstance(c, str) and os.path.isfile(c)]
    if found:
        return found[0]
    host = "huggingface.co" if hub else urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UserError(f"the '{tag_name}' weights of {model_name} are not cached and {host} cannot be reached "
                        f"(offline?); fetch {f'hf-hub:{repo}' if hub else url} where you can and pass --pretrained "
                        f"FILE" + (f" --model {model_name}-quickgelu" if tag.get("quick_gelu") else "")
                        + ", or copy its Hugging Face cache folder here")
    return quietly(download_pretrained, tag)


def with_prompts(scenes, path):
    """The scenes with the class names and/or templates of a --prompts file: {"classnames": {folder:
    name, ...}, "templates": ["a satellite photo of {}.", ...]}; every class of the data set needs a name."""
    if path is None:
        return scenes
    try:
        prompts = read_json(path)
        names, templates = prompts.get("classnames"), prompts.get("templates")
        assert set(prompts) <= {"classnames", "templates"} and prompts
    except OSError as e:
        raise UserError(f"--prompts {path} cannot be read ({e.strerror}); pass a JSON file")
    except (ValueError, AssertionError, AttributeError):
        raise UserError(f"--prompts {path} is not a JSON object with 'classnames' ({{folder: name}}) and/or "
                        f"'templates' ([\"... {{}} ...\"]); fix the file")
    missing = [c for c in scenes.classes if not isinstance(names, dict) or not isinstance(names.get(c), str)]
    if names is not None and missing:
        raise UserError(f"--prompts {path} has no class name for {missing[0]!r}" + (f" (and {len(missing) - 1} "
                        f"more)" if len(missing) > 1 else "") + f" of {scenes.dataset}; add it under 'classnames'")
    if templates is not None and not (isinstance(templates, list) and templates and
                                      all(isinstance(t, str) and t.count("{}") == 1 for t in templates)):
        raise UserError(f"--prompts {path}: 'templates' must be a list of strings with one '{{}}' each; fix the file")
    return replace(scenes, classnames=[names[c] for c in scenes.classes] if names is not None else scenes.classnames,
                   templates=tuple(templates) if templates is not None else scenes.templates)


def trained_on(record, scenes):
    """Whether a checkpoint (its patched.json or student record) was trained on these scenes: the
    same scene set (scene_set), or the same folder read under another data-set name (a RESISC45
    folder as --data folder). Scene ids alone do not decide: other folders may name files alike."""
    trained = record.get("scenes") or scene_set(record["dataset"], record.get("root") or DATA[record["dataset"]].root or "")
    return trained == scene_set(scenes.dataset, scenes.root) or \
        (bool(record.get("root")) and os.path.realpath(record["root"]) == os.path.realpath(scenes.root))


def head_prompts(scenes, records=(), path=None):
    """The scenes with the prompts of their zero-shot head: a --prompts file when given; else those of
    the first record (patched.json or a student's, trained on these scenes) with the same classes,
    as the checkpoint was trained with; else the data set's own."""
    if path:
        return with_prompts(scenes, path)
    for record in records:
        if list(record["classes"]) == list(scenes.classes) and "classnames" in record:
            return replace(scenes, classnames=list(record["classnames"]), templates=tuple(record["templates"]))
    return scenes


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames, templates, device):
    """The zero-shot head W (embed_dim, classes): for each class c,
        w_c = normalise( mean_t normalise( text_encoder(template_t(c)) ) ),
    computed with open_clip's build_zero_shot_classifier (Radford et al. 2021, Sec. 3.1.4)."""
    from open_clip import build_zero_shot_classifier
    model.eval()
    return build_zero_shot_classifier(model, tokenizer, list(classnames), list(templates),
                                      num_classes_per_batch=10, device=device).float()


def zeroshot_logits(features, head, logit_scale):
    """Class logits of image embeddings: exp(logit_scale) * normalise(f) @ W."""
    return logit_scale.exp() * F.normalize(features.float(), dim=-1) @ head


def average_precision(scores, positives):
    """Average precision (sklearn's average_precision_score): AP = sum_n (R_n - R_{n-1}) P_n over
    the distinct scores n in decreasing order, precision P_n and recall R_n of the images scoring
    >= n; tied scores form one threshold. NaN when there are no positives."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], positives[order].double()
    if y.sum() == 0:
        return math.nan
    last_of_tie = torch.ones(len(s), dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    true_pos = y.cumsum(0)[last_of_tie]
    precision = true_pos / torch.arange(1, len(s) + 1, dtype=torch.double)[last_of_tie]
    recall = true_pos / true_pos[-1]
    return (torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum().item()


def mean_average_precision(scores, targets):
    """Mean average precision (CLIP_benchmark's mean_average_precision for multi-label data): AP
    of each class's column of scores against its 0/1 targets, averaged over the classes with at
    least one positive. Returns (mAP, per-class APs). Equal to CLIP_benchmark's when no scores tie
    and every class has positives (it ranks ties in sort order and counts such classes as 0)."""
    aps = torch.tensor([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    return aps.nanmean().item(), aps


@torch.no_grad()
def embed(dataset, encoders, device, batch_size=256, workers=0):
    """Every image of a split read once and embedded by each encoder (name -> function of a raw
    batch; its model in eval mode) in the same pass: ({name: (N, D) float32 on the CPU}, labels,
    dataset indices); row i is the same scene for every encoder."""
    features, labels, index = {name: [] for name in encoders}, [], []
    for batch in batch_loader(dataset, batch_size, workers=workers, desc=f"embed {dataset.scenes.split}"):
        with autocast(device):
            for name, encode in encoders.items():
                features[name].append(encode(batch["images"]).float().cpu())
        labels.append(batch["labels"])
        index.append(batch["index"])
    return {name: torch.cat(f) for name, f in features.items()}, torch.cat(labels), torch.cat(index)


def zeroshot_score(features, labels, head, logit_scale):
    """The zero-shot score of embeddings through a head: ('acc', top-1 accuracy) for one class per
    image, ('map', mean average precision) for (N, C) 0/1 multi-label targets."""
    logits = zeroshot_logits(features, head.float().cpu(), logit_scale.detach().float().cpu())
    if labels.ndim == 2:
        return "map", mean_average_precision(logits, labels)[0]
    return "acc", (logits.argmax(1) == labels).float().mean().item()


def clip_encoder(clip, pixels, device):
    """A CLIP's image encoder of raw batches: RGB images, or the RGB composite of Sentinel-2 bands."""
    return lambda raw: clip.encode_image(clip_input(raw, clip.visual.preprocess_cfg, device, pixels=pixels))


def student_encoder(student, pixels, device):
    """A student's encoder of raw Sentinel-2 batches."""
    return lambda raw: student(ms_input(raw, student.input_size, device, pixels=pixels))


class Student(torch.nn.Module):
    """The Sentinel-2 encoder: a timm backbone with a len(S2_BANDS)-band patch embedding, its
    pooled features, then a linear projection to CLIP's embedding size."""

    def __init__(self, arch, embed_dim, input_size=None, in_chans=len(S2_BANDS), drop_path_rate=0.0):
        super().__init__()
        import timm
        cfg = timm.get_pretrained_cfg(arch)
        if cfg is None:
            raise UserError(f"--student {arch} is not a timm model; see timm.list_models(), e.g. vit_small_patch16_224")
        self.input_size = input_size or cfg.input_size[-1]
        size = {"img_size": self.input_size} if self.input_size != cfg.input_size[-1] else {}
        kw = dict(pretrained=False, in_chans=in_chans, num_classes=0, drop_path_rate=drop_path_rate)
        try:
            self.backbone = timm.create_model(arch, **kw, **size)
        except TypeError:  # a CNN has no fixed input size: it takes any --input-size as it is
            self.backbone = timm.create_model(arch, **kw)
        self.proj = torch.nn.Linear(self.backbone.num_features, embed_dim)

    def forward(self, x):
        return self.proj(self.backbone(x))


PATCHED_HINT = "the run folder of 01_patch_clip.py (it holds patched.json, open_clip_config.json and the weights)"


def patched_folder(path, flag="--teacher"):
    """Stage 1's run folder from --teacher/--ckpt: the folder itself or any file of it."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.exists(path) or not os.path.isfile(os.path.join(folder, "patched.json")):
        what = "does not exist" if not os.path.exists(path) else "is not a stage-1 output (no patched.json)"
        raise UserError(f"{flag} {path} {what}; pass {PATCHED_HINT}")
    return folder


def load_teacher(path, device, flag="--teacher"):
    """A patched CLIP of stage 1, its metadata (patched.json) and tokenizer, rebuilt by open_clip from
    the folder ("local-dir:") with the architecture and preprocessing stage 1 recorded there."""
    folder = patched_folder(path, flag)
    try:
        meta = read_json(os.path.join(folder, "patched.json"))
        assert meta["kind"] == "rsclip-align/patched-clip"
    except Exception:
        raise UserError(f"{flag} {path}: {folder}/patched.json is not the metadata of a patched CLIP; pass {PATCHED_HINT}")
    weights = os.path.join(folder, OPEN_CLIP_WEIGHTS)
    if not os.path.isfile(weights) or sha256_of(weights) != meta["weights_sha256"]:
        raise UserError(f"{weights} is missing or differs from the weights recorded in {folder}/patched.json; "
                        f"re-run 01_patch_clip.py")
    model, tokenizer, _ = load_clip("local-dir:" + folder, None, device)
    return model.eval(), meta, tokenizer


# ============================================================================ runs
#
# A run writes into OUT.partial/ and, once finished, renames it to OUT (replacing an earlier run
# there only then): OUT only ever holds a finished run. After an error or a stop, OUT.partial/ stays
# if it holds an end-of-epoch checkpoint (last.pt) for --resume, and is removed otherwise.


def run_stage(run, args):
    """How every stage's main() ends: on bad input one line `error: ...`, exit code 2 (a traceback
    with --debug); on Ctrl-C or SIGTERM one line saying what was kept, exit code 130."""
    def stop(signum, frame):
        raise KeyboardInterrupt()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt as e:
        print(f"stopped: {str(e) or 'nothing was saved'}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


FINISHED = {"01_patch_clip.py": "patched.json", "02_align_s2.py": "student.pt", "03_eval.py": "metrics.json"}


def finished_by(folder):
    """The stage whose finished run a folder holds (by its marker file), or None."""
    return next((stage for stage, marker in FINISHED.items() if os.path.exists(os.path.join(folder, marker))), None)


def check_run(out, stage, resume=False, overwrite=False):
    """Before any work, writing nothing: OUT may hold only a finished run of this stage (replaced with
    --overwrite), OUT.partial an unfinished one (continued with --resume, discarded with --overwrite)
    unless its process still runs."""
    out, go_on = os.path.abspath(out), "--resume to continue it, " if stage != "03_eval.py" else ""
    check_writable(out, "--out", "DIR")
    if os.path.exists(f"{out}.replaced"):
        raise UserError(f"{out}.replaced exists (a run stopped while it replaced {out}): move it back to {out} or "
                        f"delete it")
    if os.path.isdir(out) and os.listdir(out):
        if finished_by(out) != stage:
            raise UserError(f"{out} holds {f'a run of {finished_by(out)}' if finished_by(out) else 'no finished run'}"
                            f"; pass another --out (a run folder holds one stage's run)")
        if not (overwrite or resume):  # a resumed run was started with --overwrite
            raise UserError(f"{out} already holds a finished run; pass --overwrite or another --out")
    try:
        with open(f"{out}.partial/pid") as f:
            pid = int(f.read())
        os.kill(pid, 0)  # raises when no such process runs
        running = pid != os.getpid()
    except (OSError, ValueError):
        running = False
    if running:
        raise UserError(f"{out}.partial is in use by a running process (pid {pid}); wait for it, or pass another --out")
    if resume and not os.path.isfile(f"{out}.partial/last.pt"):
        raise UserError(f"nothing to resume: {out}.partial/last.pt does not exist; drop --resume to start afresh")
    if os.path.exists(f"{out}.partial") and not (resume or overwrite):
        raise UserError(f"{out}.partial holds an unfinished run (its process has ended); pass {go_on}--overwrite to "
                        f"start afresh, or another --out")


@contextlib.contextmanager
def run_folder(out, stage, resume=False, overwrite=False):
    """The folder a run writes into, OUT.partial/, made by this run (or with --resume the one it
    continues), renamed to OUT when the block ends; on an error or a stop it is removed unless it
    holds a checkpoint to resume from."""
    check_run(out, stage, resume, overwrite)
    out = os.path.abspath(out)  # also "runs/x/" and "."
    work = f"{out}.partial"
    if not resume:
        if overwrite:
            shutil.rmtree(work, ignore_errors=True)
        os.makedirs(os.path.dirname(work), exist_ok=True)
        try:
            os.mkdir(work)  # atomic: of two runs started at once into one folder, one gets it
        except FileExistsError:
            raise UserError(f"{work} was just made by another run; pass another --out")
    with open(os.path.join(work, "pid"), "w") as f:  # a later run leaves this folder alone while this process runs
        f.write(str(os.getpid()))
    try:
        yield work
    except BaseException as e:
        if not os.path.isfile(os.path.join(work, "last.pt")):
            shutil.rmtree(work, ignore_errors=True)
            raise
        if not isinstance(e, (UserError, KeyboardInterrupt)):
            raise
        kept = f"the last finished epoch is kept in {work}/last.pt: --resume with the same flags continues it"
        raise type(e)(f"{e}; {kept}" if str(e) else kept) from None
    for scratch in ("last.pt", "pid"):  # finished: nothing left to resume
        if os.path.exists(os.path.join(work, scratch)):
            os.remove(os.path.join(work, scratch))
    if os.path.exists(out):
        os.rename(out, f"{out}.replaced")
    os.rename(work, out)
    shutil.rmtree(f"{out}.replaced", ignore_errors=True)


def check_writable(path, flag, kind="FILE"):
    """That a FILE (or a DIR to make) can be written at `path`, writing nothing: no folder where a file
    goes (or file where a folder goes), and the nearest existing folder above it writable."""
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    wrong = os.path.exists(path) and os.path.isdir(path) != (kind == "DIR")
    if wrong or not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path} (" + (f"a {'file' if kind == 'DIR' else 'folder'} is there" if wrong else
                        f"{existing} is not a writable folder") + f"); pass another {flag} {kind}")


def write_atomic(path, write):
    """Write a file whole or not at all: `write(tmp_path)`, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix="." + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tidy(obj):
    """For JSON: a float that holds a float32 value (a loss, a learning rate from a tensor) is written
    with the shortest digits that give back that float32 (0.025, not 0.02500000037252903)."""
    if isinstance(obj, float) and np.isfinite(obj) and float(np.float32(obj)) == obj:
        return float(str(np.float32(obj)))
    if isinstance(obj, dict):
        return {k: tidy(v) for k, v in obj.items()}
    return [tidy(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def write_json(path, obj, indent=2):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(tidy(obj), f, indent=indent, sort_keys=True, default=str)
            f.write("\n")
    write_atomic(path, write)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_torch(path, obj):
    def write(tmp):
        with open(tmp, "wb") as f:  # through a file object, so the bytes depend on `obj` only
            torch.save(obj, f)
    write_atomic(path, write)


def load_torch(path, what, fix):
    """torch.load(weights_only=True) with one clear line when the file is missing or broken."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"it may be truncated; {fix}")


def describe_run(args, device, stage):
    """args.json (DINO-style): the sorted arguments, stage, versions, device and git revision; prints one line."""
    import open_clip
    import timm
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:
        git = ""
    versions = {m.__name__: m.__version__ for m in (torch, torchvision, open_clip, timm, np)}
    info = {"args": dict(sorted(vars(args).items())), "stage": stage, "device": str(device), "git": git or "unknown",
            "versions": {"python": platform.python_version(), **versions},
            **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})}
    print(f"device {info.get('gpu', device)} | torch {torch.__version__} open_clip {open_clip.__version__} "
          f"timm {timm.__version__} | git {info['git']} | run folder {args.out} (flags in args.json)")
    return info


# Not what a resume must keep: how and where it runs; paths (the data and the teacher are compared by hash).
NOT_SETTINGS = {"resume", "overwrite", "debug", "workers", "device", "cache", "no_plots", "redraw", "out", "root",
                "teacher", "control_root"}


def run_identity(args, **data):
    """What a --resume must share with the run it continues: every flag that shapes the results, and
    `data` (hashes of the training list, the teacher's weights)."""
    flags = json.loads(json.dumps(vars(args), default=str))
    return {**{k: v for k, v in sorted(flags.items()) if k not in NOT_SETTINGS}, **data}


def save_checkpoint(work, identity, epoch, step, history, **states):
    """The end of an epoch: work/last.pt (atomically) with the run's identity, the epoch and step
    reached, the epoch log, the RNG and the `states` (model, optimizer, scheduler); and the epoch
    log as work/log.jsonl, one JSON line per epoch."""
    save_torch(os.path.join(work, "last.pt"), {
        "identity": identity, "epoch": epoch, "step": step, "history": history, "torch_rng": torch.get_rng_state(),
        **{k: v.state_dict() for k, v in states.items()}})
    with open(os.path.join(work, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(tidy(row), sort_keys=True) + "\n" for row in history)


def load_checkpoint(work, identity, **states):
    """--resume: work/last.pt restored into `states`, once it is shown to be this run's (same flags,
    training list and teacher); returns (the next epoch, step, epoch log)."""
    ckpt = load_torch(os.path.join(work, "last.pt"), "resume checkpoint", "drop --resume to start afresh")
    saved = ckpt.get("identity", {})
    changed = sorted(k for k in saved.keys() | identity.keys() if saved.get(k) != identity.get(k))
    words = {"train_files_sha256": "the training list changed", "teacher_sha256": "the teacher's weights changed"}
    if changed:
        raise UserError(f"--resume of another run than {work}/last.pt was saved by: " + ", ".join(
            words.get(k, f"--{k.replace('_', '-')} was {saved.get(k)}") for k in changed)
            + "; resume with the flags, data and teacher it was started with, or pass --overwrite to start afresh")
    for k, v in states.items():
        v.load_state_dict(ckpt[k])
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["epoch"] + 1, ckpt["step"], ckpt["history"]


def cosine_schedule(optimizer, total_steps, warmup_steps):
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine decay to 0 (torch's schedulers)."""
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = sched.LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def check_finite(loss, step):
    if not torch.isfinite(loss):
        raise UserError(f"loss became {loss.item()} at step {step}; check the data, or start afresh with a lower "
                        f"--lr (--overwrite)")


def new_figure(width, height, ncols=1, **subplots):
    """An empty matplotlib Figure (inches at 100 dpi; no pyplot, so no global state) with `ncols` axes."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False, **subplots)[0]


def redraw(folder, stage, pictures, debug=False):
    """--redraw OUT: draw the pictures of a finished run of this stage again, from its JSON alone
    (its args.json names the stage, its metrics.json says it finished)."""
    args = os.path.join(folder, "args.json")
    if not (os.path.isfile(os.path.join(folder, "metrics.json")) and os.path.isfile(args)
            and read_json(args).get("stage") == stage):
        raise UserError(f"{folder} holds no finished run of {stage}; pass --redraw OUT of one")
    draw_pictures(folder, pictures(folder) if callable(pictures) else pictures, debug)


def draw_pictures(folder, pictures, debug=False):
    """A run's pictures {file name: function(folder) -> Figure}, drawn from the JSON the run wrote in
    `folder` (redraw them with the stage's --redraw FOLDER). matplotlib is optional: without it, or
    when a picture fails, one line; a picture never costs a finished run."""
    if importlib.util.find_spec("matplotlib") is None:
        return print(f"plots: matplotlib is not installed; pip install matplotlib to get {', '.join(pictures)} "
                     f"(or pass --no-plots)")
    for name, plot in pictures.items():
        try:
            figure = plot(folder)
            write_atomic(os.path.join(folder, name), lambda tmp: figure.savefig(tmp, format="png"))
            print(f"plots: wrote {os.path.join(folder, name)}")
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{folder} is saved, its pictures are not; draw them with --redraw {folder}")
        except Exception as e:
            if debug:
                raise
            print(f"plots: could not draw {name} ({type(e).__name__}: {str(e)[:160]}); the run is saved")
