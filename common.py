"""What two or more stages of rsclip-align share.

Sections, in the order the data flows:
  errors        UserError (one clear line, exit code 2) and Session: how every stage ends, on bad
                input, Ctrl-C/SIGTERM or a reader that stops early
  data          class names, prompt templates, file lists, splits, readers, packed cache
  transforms    the RGB composite and the per-modality device-side preprocessing
  models        open_clip loading, the zero-shot head and its logits
  run folders   atomic writes, the run-folder lock, run metadata, resumable training state
  plots         the pictures of a run, drawn from the JSON it wrote (matplotlib, optional)
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
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

# ============================================================================ errors


class UserError(Exception):
    """Bad input the user can fix: printed as one line (naming the file or flag and the fix), exit 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the stage stops where it is (see Session)."""


class QuietPipe:
    """sys.stdout that lets a run finish when its reader goes away (`python 03_eval.py | head`):
    the rest of the output goes to /dev/null, the work and its files are not lost."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.drop()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.drop()

    def drop(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # the pending output and all later output go nowhere
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Session:
    """What a stage's main() runs in, so that it ends the same way wherever it stops:
    - UserError: one line `error: ...` and exit code 2 (the traceback with --debug);
    - Ctrl-C or SIGTERM, at any moment: one line saying what was saved and how to go on
      (`on_stop`, a text or a function, kept up to date by the stage) and exit code 130. Inside `deferred()` (a training
      loop) a signal only sets `stop_requested`: the loop finishes its step and saves last.pt first;
    - the locks on run folders (lock_run_dir) are released;
    - output piped into a reader that stops early (`| head`) does not stop the run (QuietPipe)."""

    def __init__(self, debug=False):
        self.debug, self.stop_requested, self.defer, self.locks = debug, None, False, []
        self.on_stop = "nothing was written; run the same command again"

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.stdout, sys.stdout = sys.stdout, QuietPipe(sys.stdout)
        return self

    def handle(self, signum, frame):
        self.stop_requested = signal.Signals(signum).name
        if not self.defer:
            raise Interrupted(self.stop_requested)

    @contextlib.contextmanager
    def deferred(self):
        """Signals wait for the end of the current training step (see checkpoint_step)."""
        self.defer = True
        try:
            yield
        finally:
            self.defer = False
        if self.stop_requested:  # arrived after the last step's check
            raise Interrupted(self.stop_requested)

    def __exit__(self, kind, error, tb):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        sys.stdout.flush()
        sys.stdout = self.stdout
        for lock in self.locks:
            lock.close()  # closing the file releases its flock
        self.locks = []
        if kind is UserError and not self.debug:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2)
        if kind in (Interrupted, KeyboardInterrupt):
            name = str(error) if kind is Interrupted else "SIGINT"
            note = self.on_stop() if callable(self.on_stop) else self.on_stop
            print(f"\n{name}: stopped; {note}", file=sys.stderr)
            raise SystemExit(130)
        return False


# ============================================================================ data
#
# A data set is one entry of DATA (at the end of this section): its modality, default root,
# lister (files, labels, class names), reader, templates, pixel format (bands, RGB constant) and
# whether it has official splits and multi-label targets. The stages never branch on its name.

# Sentinel-2 band order of the EuroSAT MS GeoTIFFs (B8A comes last): the student's input order.
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
# Band order of the SSL4EO-S12 L1C pretraining data (B8A right after B08).
SSL4EO_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
RGB_BANDS = ("B04", "B03", "B02")  # red, green, blue
L1C_RGB_MAX = 3558.0  # L1C digital number shown as grey level 255 in the EuroSAT RGB release
L2A_RGB_MAX = 2000.0  # L2A digital number shown as 255 in the official code's BigEarthNet RGB
REFLECTANCE_SCALE = 1.0 / 10000.0  # digital number -> reflectance (L1C top of atmosphere, L2A surface)
# BigEarthNet-S2 v1.0 stores each L2A band at its own resolution (no B10): 10 m, 20 m, 60 m.
BIGEARTHNET_BANDS = (("B02", "B03", "B04", "B08"), ("B05", "B06", "B07", "B8A", "B11", "B12"), ("B01", "B09"))
BIGEARTHNET_SIZES = (120, 60, 20)  # pixels a side of each group
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
    """How an 'ms' data set stores its bands: the band names of each stored array (one array per
    resolution), and the digital number its RGB composite shows as grey level 255."""
    bands: tuple
    rgb_max: float


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

    @property
    def pixels(self):
        return DATA[self.dataset].pixels

    @property
    def multilabel(self):
        return self.labels is not None and self.labels.ndim == 2

    def subset(self, indices, split):
        official = None if self.official_split is None else [self.official_split[i] for i in indices]
        return replace(self, files=[self.files[i] for i in indices], labels=self.labels[indices], split=split,
                       official_split=official)


def folder_classname(folder):
    """A prompt-ready name from a folder name: 'baseball_diamond' / 'SeaLake' -> 'baseball diamond' / 'sea lake'."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder).replace("_", " ").replace("-", " ").lower()


def download_eurosat(root):
    """torchvision's EuroSAT download into root/eurosat/2750/; a failed download leaves nothing behind."""
    import shutil
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
    """A class-folder data set: <folder>/<ClassName>/<files>, with <folder> the first of `subfolders`
    under root that exists, or root. `classnames`: a dict (folder -> prompt name; other folders are
    refused) or a function of the folder name."""
    if download and fetch:
        fetch(root)
    folder = next((os.path.join(root, s) for s in subfolders if os.path.isdir(os.path.join(root, s))), root)
    if not os.path.isdir(folder):
        hint = f" (01_patch_clip.py --data {dataset} --download fetches it)" if fetch else ""
        raise UserError(f"data folder {folder} does not exist; pass --root DIR{hint}")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise UserError(f"{folder} has no class sub-folders; expected {folder}/<ClassName>/<image files>")
    files, labels = [], []
    for label, name in enumerate(classes):
        listed = sorted(os.listdir(os.path.join(folder, name)))
        names = [f for f in listed if f.lower().endswith(suffixes)]
        if not names:
            rgb = [f for f in listed if f.lower().endswith(RGB_SUFFIXES)]
            hint = (f"its files ({rgb[0]}, ...) look like RGB images: pass --data eurosat or --data folder"
                    if rgb else "add its images or remove the folder")
            raise UserError(f"class folder {os.path.join(folder, name)} holds no {'/'.join(suffixes)} files "
                            f"for --data {dataset}; {hint}")
        files += [os.path.join(name, f) for f in names]
        labels += [label] * len(names)
    if isinstance(classnames, dict):
        unknown = [c for c in classes if c not in classnames]
        if unknown:
            raise UserError(f"{folder} has folders {unknown} that are not {dataset} classes; use --data folder")
        names = [classnames[c] for c in classes]
    else:
        names = [classnames(c) for c in classes]
    return dict(root=folder, classes=classes, classnames=names, files=files, labels=np.array(labels, np.int64))


def bigearthnet_nomenclature():
    """The official nomenclature (data/bigearthnet/nomenclature.json, copied from the BigEarthNet
    releases): 43 label names in index order, the 19- and 5-class names and the 43 -> 19 / 5 maps."""
    with open(os.path.join(SHIPPED, "nomenclature.json")) as f:
        return json.load(f)


def official_splits(folder=SHIPPED):
    """patch name -> 'train'/'val'/'test' from the official BigEarthNet-S2 v1.0 lists (shipped in
    data/bigearthnet/; the seasonal-snow and cloud/shadow patches are not on them)."""
    import bz2
    splits = {}
    for split in ("train", "val", "test"):
        with bz2.open(os.path.join(folder, f"{split}.csv.bz2"), "rt") as f:
            splits.update((line.strip(), split) for line in f if line.strip())
    return splits


def list_bigearthnet(dataset, root, download=False, n_classes=19):
    """BigEarthNet-S2 v1.0: root/BigEarthNet-v1.0/<patch>/<patch>_<band>.tif and
    <patch>_labels_metadata.json (or root is that folder). Only patches on the official lists
    are kept; a patch without a label among the `n_classes` is left out; both are counted."""
    folder = next((p for p in (os.path.join(root, "BigEarthNet-v1.0"), root) if os.path.isdir(p)), root)
    if not os.path.isdir(folder):
        raise UserError(f"data folder {root} does not exist; pass --root DIR holding BigEarthNet-v1.0/<patch folders>")
    entries = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if (os.path.exists(os.path.join(root, "metadata.parquet")) or "BigEarthNet-S2" in entries
            or any(re.search(r"_N\d{4}_R\d{3}_T\w{5}$", d) for d in entries[:50])):
        raise UserError(f"{root} looks like BigEarthNet v2.0 (reBEN), which this project does not read; "
                        f"pass --root DIR of the BigEarthNet-S2 v1.0 archive (BigEarthNet-v1.0/<patch folders>)")
    nomenclature = bigearthnet_nomenclature()
    index43 = {name: i for i, name in enumerate(nomenclature["labels43"])}
    classes = nomenclature[f"labels{n_classes}"]
    mapping = {int(k): v for k, v in nomenclature[f"map43to{n_classes}"].items()} if n_classes != 43 else \
        {i: i for i in range(43)}
    split_of = official_splits()
    files, splits, targets, left_out, unusable = [], [], [], {}, {}
    for name in entries:
        if name not in split_of:
            reason = "not on the official lists (seasonal snow, cloud or shadow, or not BigEarthNet-S2 v1.0)"
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        target = np.zeros(len(classes), np.uint8)
        path = os.path.join(folder, name, f"{name}_labels_metadata.json")
        try:
            with open(path) as f:
                names = json.load(f)["labels"]
            unknown = [n for n in names if n not in index43]
            if unknown:
                raise ValueError(f"has label {unknown[0]!r}, not a BigEarthNet-v1.0 (43-class) name")
            for n in names:
                if index43[n] in mapping:
                    target[mapping[index43[n]]] = 1
        except (OSError, ValueError, KeyError, TypeError) as e:
            unusable[name] = f"{path}: {e}" if isinstance(e, ValueError) and "label" in str(e) else \
                f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]})"
        if not target.any() and name not in unusable:
            reason = f"with no label among the {n_classes} classes"
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        files.append(name)
        splits.append(split_of[name])
        targets.append(target)
    if not files:
        raise UserError(f"{folder} holds no BigEarthNet-S2 v1.0 patch folders of the official splits "
                        f"({', '.join(f'{n} {r}' for r, n in left_out.items()) or 'no sub-folders'}); "
                        f"pass --root DIR holding BigEarthNet-v1.0/<patch>/<patch>_B02.tif, ...")
    return dict(root=folder, classes=classes, classnames=[c.lower() for c in classes], files=files,
                labels=np.stack(targets), official_split=splits, left_out=left_out, unusable=unusable)


def list_scenes(dataset, root=None, download=False):
    """All labelled scenes of a data set, with the official split of each where it has one."""
    if dataset not in DATA:
        raise UserError(f"unknown --data '{dataset}'; choose one of {', '.join(DATASETS)}")
    entry = DATA[dataset]
    root = root or entry.root
    if root is None:
        raise UserError(f"--data {dataset} needs its folder: --root DIR (or --data {dataset}=DIR), a folder with one "
                        f"sub-folder of images per class")
    listed = entry.lister(dataset, root, download)
    templates = entry.templates if entry.templates is not None else imagenet_prompts()[1]
    return Scenes(dataset, modality=entry.modality, templates=templates, **listed)


def scene_set(dataset, root):
    """Which scenes a data set's files show, as a name: 'eurosat' for both EuroSAT entries (one
    set of scenes as jpgs and as tifs), 'bigearthnet' for its 19-, 43- and 5-class entries, the
    folder's real path for a class folder (the same folder read as --data folder or resisc45 is
    the same scenes). A checkpoint trained on one is held to its split on all of them."""
    return DATA[dataset].scenes or os.path.realpath(root)


def scene_id(file):
    """A scene's id: its path below the data root without extension (EuroSAT's jpg and tif of one
    scene share it)."""
    return os.path.splitext(file)[0].replace(os.sep, "/")


def scene_hash(seed, scene):
    """A scene's draw for a seed: the first 8 bytes of SHA-256("<seed>/<scene id>"), an integer."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{scene}".encode()).digest()[:8], "big")


def hashed_split(ids, seed):
    """The split of each scene from its id and the seed alone: u = the first 8 bytes of
    SHA-256("<seed>/<id>") as a fraction of 2^64, train if u < 0.7, val if u < 0.8, else test
    (SPLIT_FRACTIONS). Adding or removing files never moves another scene; the fractions hold in
    expectation (not exactly per class)."""
    cuts = np.cumsum(list(SPLIT_FRACTIONS.values()))
    u = np.array([scene_hash(seed, i) / 2 ** 64 for i in ids])
    return [list(SPLIT_FRACTIONS)[k] for k in np.searchsorted(cuts, u, side="right")]


def split_indices(scenes, seed):
    """{'train', 'val', 'test'} -> sorted indices of the scenes: the official split where the data
    set has one (the seed is then unused), else hashed_split of the scene ids."""
    names = scenes.official_split or hashed_split([scene_id(f) for f in scenes.files], seed)
    names = np.array(names)
    return {split: np.flatnonzero(names == split) for split in SPLIT_FRACTIONS}


def take_split(scenes, split, seed):
    """One split ('train', 'val', 'test', or 'all' of them) of listed scenes."""
    if split == "all":
        return replace(scenes, seed=seed)
    return replace(scenes.subset(split_indices(scenes, seed)[split], split), seed=seed)


def load_split(dataset, root, split, seed, download=False):
    """The scenes of one split ('train', 'val', 'test', or 'all' of them) of a data set."""
    return take_split(list_scenes(dataset, root, download), split, seed)


def per_class_subset(scenes, n, seed):
    """At most n scenes of each class, the same ones for the same seed whatever else the folders
    hold: in each class the n with the smallest SHA-256("<seed>/<scene id>") (as hashed_split)."""
    if n < 1:
        raise UserError(f"a per-class subset needs at least 1 image per class, not {n}")
    if scenes.multilabel:
        raise UserError(f"a per-class subset needs one class per image; {scenes.dataset} is multi-label")
    rank = {i: scene_hash(seed, scene_id(f)) for i, f in enumerate(scenes.files)}
    keep = [i for c in np.unique(scenes.labels)
            for i in sorted(np.flatnonzero(scenes.labels == c).tolist(), key=rank.get)[:n]]
    return scenes.subset(sorted(keep), scenes.split)


def left_out_note(scenes):
    """'; left out 57 scenes with no label among the 19 classes, ...' or ''."""
    notes = ", ".join(f"{n} scenes {reason}" for reason, n in scenes.left_out.items())
    return f"; left out {notes}" if notes else ""


def write_scenes(path, scenes):
    """The ids of a split's scenes, sorted, one a line; returns the file's SHA-256."""
    write_atomic(path, lambda tmp: open(tmp, "w").writelines(f"{i}\n" for i in sorted(map(scene_id, scenes.files))))
    return sha256_of(path)


def read_scenes(path, sha256):
    """The scene ids a write_scenes() file holds, checked against its recorded hash."""
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


def read_rgb(path):
    """An 8-bit image as uint8 (H, W, 3), read with PIL."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants
    except Exception as e:
        raise ValueError(f"cannot decode image ({type(e).__name__}: {e})")


def read_tif(path):
    """A GeoTIFF as a numpy array (tifffile); ValueError with the reason when it cannot be read."""
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.CRITICAL)  # its log lines on a broken file would repeat the reason below
    try:
        return tifffile.imread(path)
    except Exception as e:
        raise ValueError(f"cannot read GeoTIFF ({type(e).__name__}: {e})")
    finally:
        tiff_log.setLevel(level)


def read_s2_tif(path):
    """A 13-band EuroSAT MS tif as uint16 (H, W, 13) in S2_BANDS order (bands-first tifs accepted)."""
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
            image = read_tif(path)
            if image.shape != (size, size) or image.dtype != np.uint16:
                raise ValueError(f"band {path} is {image.dtype} {image.shape}, expected uint16 ({size}, {size})")
            group.append(image)
        groups.append(np.stack(group, axis=-1))
    return tuple(groups)


def read_image(path, modality):
    """One file as a channels-last array: uint8 (H, W, 3) for 'rgb', uint16 (H, W, 13) for 'ms'.
    Raises ValueError with the reason when the file cannot be used."""
    return {"rgb": read_rgb, "ms": read_s2_tif}[modality](path)


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


def imagenet_prompts():
    """ImageNet's class names and the 80 templates of the CLIP paper, as open_clip ships them,
    keyed by the ILSVRC-2012 synset ids in their standard (sorted) order, which timm ships: the
    1000 names follow that order, so a folder named by its synset id gets its name."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo
    synsets = ImageNetInfo().label_names()
    assert len(synsets) == len(IMAGENET_CLASSNAMES) == 1000 and synsets == sorted(synsets)
    return dict(zip(synsets, IMAGENET_CLASSNAMES)), tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def list_imagenet(dataset, root, download=False):
    """The ILSVRC-2012 validation set, one folder per synset (n01440764/*.JPEG, ...), as torchvision's
    ImageFolder reads it; a folder may hold any subset of the 1000 synsets. Its images are the
    test split of every published ImageNet zero-shot figure, so all of them are 'test'."""
    names, _ = imagenet_prompts()
    folder = next((p for p in (os.path.join(root, "val"), root) if os.path.isdir(p)), root)
    if os.path.isdir(folder):
        unknown = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and d not in names)
        if unknown:
            raise UserError(f"{os.path.join(folder, unknown[0])} is not an ILSVRC-2012 synset folder"
                            + (f" (nor {len(unknown) - 1} more)" if len(unknown) > 1 else "") + "; --data imagenet "
                            f"reads the validation set as <root>/<synset id, e.g. n01440764>/<images> (use "
                            f"--data folder for other class folders)")
    listed = list_class_folders(dataset, folder, classnames=names)
    return {**listed, "official_split": ["test"] * len(listed["files"])}


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
}
DATASETS = tuple(DATA)
MS_DATASETS = tuple(name for name, entry in DATA.items() if entry.modality == "ms")


def parts(image):
    """A stored image as a tuple of arrays (one per resolution; a single array for most data sets)."""
    return tuple(image) if isinstance(image, (tuple, list)) else (image,)


class ImageFiles(Dataset):
    """Reads whole batches of files; `dataset[list_of_indices]` returns a dict with the raw images
    stacked channels-last (uint8 RGB or uint16 MS, no resizing or scaling: that happens on the
    device; a tuple of such stacks, one per resolution, for BigEarthNet), their labels and
    indices, and `bad`: (path, reason) of files that could not be used.

    All images of a batch must share one size: files of another size than the first are bad,
    except 8-bit RGB images, which are resized to it on the CPU (e.g. a few 256x247 tiles)."""

    def __init__(self, scenes):
        self.scenes = scenes
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
        self.shape, self.dtype = self.shapes[0], self.dtypes[0]

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
                if [p.shape for p in image] != self.shapes:
                    if self.scenes.modality == "ms":
                        raise ValueError(f"has shape {image[0].shape}, the others have {self.shape}")
                    image = (TF.resize(torch.from_numpy(image[0]).permute(2, 0, 1), list(self.shape[:2]),
                                       antialias=True).permute(1, 2, 0).numpy(),)
            except ValueError as e:
                bad.append((os.path.join(self.scenes.root, self.scenes.files[i]), str(e)))
                continue
            images.append(image)
            kept.append(i)
        kept = np.array(kept, np.int64)
        stacks = [torch.from_numpy(np.stack([im[k] for im in images]) if images else
                                   np.zeros((0, *shape), dtype)) for k, (shape, dtype) in
                  enumerate(zip(self.shapes, self.dtypes))]
        return {"images": stacks[0] if len(stacks) == 1 else tuple(stacks),
                "labels": torch.from_numpy(self.scenes.labels[kept]), "index": torch.from_numpy(kept), "bad": bad}


def packed_name(k):
    """The .npy of stored array k of a packed split: images.npy, images1.npy, ..."""
    return f"images{k or ''}.npy"


class PackedImages(Dataset):
    """The same batches as ImageFiles, sliced from memory-mapped .npy files of a whole split (one
    per stored array, each at its own resolution)."""

    def __init__(self, folder, scenes, n_parts=1):
        self.scenes = scenes
        self.parts = [np.load(os.path.join(folder, packed_name(k)), mmap_mode="r") for k in range(n_parts)]
        self.images = self.parts[0]
        self.shape, self.dtype = self.images.shape[1:], self.images.dtype

    def __len__(self):
        return len(self.images)

    def __getitem__(self, indices):
        indices = np.asarray(indices, np.int64)
        # one copy out of the page cache (np.take: 3-6x faster here than fancy indexing into a new array)
        stacks = [torch.from_numpy(np.asarray(np.take(part, indices, axis=0))) for part in self.parts]
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
    """What identifies a split's images: the data root, split, seed and file list."""
    return {"root": os.path.abspath(scenes.root), "dataset": scenes.dataset, "split": scenes.split,
            "seed": scenes.seed, "files_sha256": sha256_of(scenes.files)}


def open_images(scenes, cache=None, workers=0):
    """The dataset of a split: ImageFiles, or with `cache` a PackedImages that is written once
    under cache/<key>/ (uint8/uint16 images.npy, labels.npy, files.json) and memory-mapped after.
    The key hashes the data root, dataset, split, seed and file list, so a change rebuilds it."""
    files = ImageFiles(scenes)
    if not cache:
        return files
    folder = os.path.join(cache, "packed-" + sha256_of(scenes_key(scenes))[:16])
    if not os.path.isfile(os.path.join(folder, "images.npy")):
        print(f"packing {len(files)} {scenes.split} images into {folder}")
        make_dirs_tmp(folder)
        stores = [np.lib.format.open_memmap(os.path.join(folder + ".tmp", packed_name(k)), "w+", dtype,
                                            (len(files), *shape))
                  for k, (shape, dtype) in enumerate(zip(files.shapes, files.dtypes))]
        loader = batch_loader(files, 512, workers=workers)
        for batch in loader:
            for path, reason in batch["bad"][:1]:  # a packed split must be complete, --skip-bad-files or not
                raise UserError(f"{path} {reason}; replace or delete the file "
                                f"(--cache packs whole splits: drop it to use --skip-bad-files)")
            for store, images in zip(stores, parts(batch["images"])):
                store[batch["index"].numpy()] = images.numpy()
        for store in stores:
            store.flush()
        del stores
        np.save(os.path.join(folder + ".tmp", "labels.npy"), scenes.labels)
        write_json(os.path.join(folder + ".tmp", "files.json"), {**scenes_key(scenes), "files": scenes.files})
        os.replace(folder + ".tmp", folder)
    return PackedImages(folder, scenes, len(files.shapes))


def make_dirs_tmp(folder):
    """A fresh folder.tmp/ (removing a stale one)."""
    import shutil
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    os.makedirs(folder + ".tmp")


def training_batches(n, batch_size):
    """Batches an epoch of n images gives in training: a last batch of a single image is left out,
    since BatchNorm (ResNet CLIPs, CNN students) cannot train on one image."""
    return n // batch_size + (n % batch_size > 1)


def batch_loader(dataset, batch_size, shuffle=False, seed=0, epoch=0, start_batch=0, workers=0,
                 drop_last=False, pin_memory=False):
    """A DataLoader over whole batches of indices. With `shuffle` (training), the order of epoch e
    is a permutation drawn from seed and e alone, so a resumed run sees the same batches from
    `start_batch` on, and there are training_batches() of them. `drop_last`: no smaller last batch."""
    n = len(dataset)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    else:
        order = list(range(n))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if shuffle:
        batches = batches[:training_batches(n, batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    if isinstance(dataset, PackedImages):  # a batch from a memory map is one copy: worker processes would only
        workers = 0                          # add another, through shared memory
    return DataLoader(dataset, batch_size=None, sampler=batches[start_batch:], num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


def check_bad_files(batch, skip_bad_files, counter=None):
    """Stop at the first unusable file, naming it; with --skip-bad-files count and go on."""
    for path, reason in batch["bad"]:
        if not skip_bad_files:
            raise UserError(f"{path} {reason}; replace or delete the file, or pass --skip-bad-files")
        if counter is not None:
            counter[path] = reason


def default_workers():
    """DataLoader worker processes: one per CPU core up to 8 (each reads ~2,500 EuroSAT tifs/s)."""
    return min(8, os.cpu_count() or 1)


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


def random_flips(x, seed, step):
    """Random horizontal and vertical flips (remote-sensing tiles have no upright), drawn from
    (seed, step) alone so that a resumed run flips the same images."""
    g = torch.Generator().manual_seed(seed * 1000003 + step)
    flip_h, flip_v = (torch.rand(2, len(x), generator=g) < 0.5).to(x.device)[:, :, None, None, None]
    x = torch.where(flip_h, x.flip(-1), x)
    return torch.where(flip_v, x.flip(-2), x)


def clip_input(raw, preprocess_cfg, device, flip_seed_step=None, pixels=None):
    """CLIP's input from a raw batch, on the device: 8-bit RGB (B, H, W, 3) as is, or Sentinel-2
    bands (`pixels`: the data set's format, see s2_bands) through rgb_composite() with the data
    set's constant; then /255, open_clip's resize and centre crop, optional random flips, and
    normalisation with the model's mean and std. `preprocess_cfg` is the model's own
    (model.visual.preprocess_cfg): size (int for ResNets, (h, w) for ViTs), resize mode,
    interpolation, mean and std, as open_clip's validation transform uses them."""
    if pixels is None:
        x = raw.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        assert x.shape[1] == 3, "Sentinel-2 bands need their data set's pixels= (bands, RGB constant)"
    else:
        x = rgb_composite(s2_bands(raw, pixels, device), pixels.rgb_max)
    x = resize_and_crop(x / 255.0, preprocess_cfg["size"], preprocess_cfg["interpolation"], clip_to=(0, 1),
                        resize_mode=preprocess_cfg.get("resize_mode", "shortest"))
    if flip_seed_step is not None:
        x = random_flips(x, *flip_seed_step)
    return TF.normalize(x, list(preprocess_cfg["mean"]), list(preprocess_cfg["std"]))


def ms_input(raw, size, device, flip_seed_step=None, pixels=None):
    """The student's input from a raw Sentinel-2 batch, on the device: the 13 bands on one grid
    (s2_bands; `pixels` None: EuroSAT's (B, H, W, 13) uint16), reflectance (digital number / 10000,
    clipped to [0, 1]), bicubic resize to the student's input size, optional random flips."""
    x = s2_bands(raw, pixels or Pixels((S2_BANDS,), None), device)
    x = torch.clamp(x * REFLECTANCE_SCALE, 0, 1)
    x = resize_and_crop(x, size, "bicubic")
    return x if flip_seed_step is None else random_flips(x, *flip_seed_step)


# ============================================================================ models


@torch.no_grad()
def embed(encoder, loader, prepare, device, skip_bad_files=False, bad=None, desc="embed"):
    """Run `encoder(prepare(raw_images))` over a loader in eval mode; returns float32 CPU
    embeddings, labels and dataset indices, in loader order."""
    features, labels, index = [], [], []
    for batch in progress_bar(loader, desc=desc, leave=False):
        check_bad_files(batch, skip_bad_files, bad)
        if len(batch["index"]) == 0:
            continue
        with autocast(device):
            features.append(encoder(prepare(batch["images"])).float().cpu())
        labels.append(batch["labels"])
        index.append(batch["index"])
    return torch.cat(features), torch.cat(labels), torch.cat(index)


def progress_bar(iterable, **kwargs):
    """A tqdm progress bar on a terminal; none when the output goes to a file (no '\\r' frames in logs)."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not sys.stderr.isatty(), **kwargs)


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
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's own folder format (save_for_hf, "local-dir:")
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def load_clip(model_name, pretrained, device="cpu"):
    """An open_clip CLIP, its tokenizer and its model config; its preprocessing is model.visual.preprocess_cfg, the
    one source every stage reads (size, mean/std, interpolation, resize mode).

    model_name: an open_clip name ('ViT-B-32', 'RN50', ...) or 'local-dir:FOLDER', a folder in
    open_clip's own format (open_clip_config.json + weights) such as stage 1's run folder or a
    downloaded hub model. pretrained: an open_clip tag ('openai', 'laion2b_s34b_b79k', ...), a
    local checkpoint file, or 'none' for random weights. A tag brings its preprocessing and, for
    OpenAI's weights, QuickGELU; a file or a local-dir brings what its config says."""
    import open_clip
    if model_name.startswith("local-dir:"):
        folder = model_name[len("local-dir:"):]
        if not os.path.isfile(os.path.join(folder, OPEN_CLIP_CONFIG)):
            raise UserError(f"--model {model_name}: {folder} holds no {OPEN_CLIP_CONFIG}; pass a folder written by "
                            f"01_patch_clip.py or open_clip's save_for_hf")
        model, _, _ = quietly(open_clip.create_model_and_transforms, model_name, device=device)
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
        model, _, _ = quietly(open_clip.create_model_and_transforms, model_name, pretrained=weights, device=device,
                              **from_tag)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if "PytorchStreamReader" in first or "zip archive" in first or "header" in first:
            raise UserError(f"--pretrained {weights} cannot be read (truncated, or not a checkpoint file); "
                            f"download or save it again")
        raise UserError(f"--pretrained {weights} does not fit {model_name} ({first}); pass the --model it was saved from")
    config = {**open_clip.get_model_config(model_name), **({"quick_gelu": True} if from_tag["force_quick_gelu"] else {})}
    return model, open_clip.get_tokenizer(model_name), config


def quietly(fn, *args, **kwargs):
    """Call open_clip without its root-logger warnings (e.g. 'No pretrained weights loaded' for the
    random weights the user asked for with --pretrained none)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return fn(*args, **kwargs)
    finally:
        root.setLevel(level)


def tag_weights(model_name, tag_name, tag):
    """The local file of an open_clip tag's weights: from the Hugging Face or open_clip cache, else
    downloaded. Offline and not cached: one line that says what to do, within seconds (the hub
    client would retry for about a minute)."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, download_pretrained
    hub, url = tag.get("hf_hub", ""), tag.get("url", "")
    if tag.get("file"):  # a tag registered with a local file (open_clip's own 'file' entry)
        return tag["file"]
    if hub:
        repo, filename = os.path.split(hub)
        for name in ([HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME] if not filename else [filename]):
            cached = huggingface_hub.try_to_load_from_cache(repo, name)
            if isinstance(cached, str):
                return cached
        host = "huggingface.co"
    else:
        cached = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(cached):
            return cached
        host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        source = f"hf-hub:{repo}" if hub else url
        raise UserError(f"the '{tag_name}' weights of {model_name} are not cached and {host} cannot be reached "
                        f"(offline?); fetch {source} where you can and pass --pretrained FILE"
                        + (f" --model {open_clip_name(model_name, True)}" if tag.get("quick_gelu") else "")
                        + ", or copy its Hugging Face cache folder here")
    return quietly(download_pretrained, tag)


def open_clip_name(model_name, quick_gelu):
    """The open_clip model name that rebuilds a CLIP as it was trained: OpenAI's weights use
    QuickGELU, which open_clip's '-quickgelu' configs select (a state dict cannot tell)."""
    import open_clip
    if quick_gelu and not model_name.endswith("-quickgelu") and f"{model_name}-quickgelu" in open_clip.list_models():
        return f"{model_name}-quickgelu"
    return model_name


def save_clip(model, config, folder):
    """A CLIP in open_clip's own folder format, which open_clip.create_model_and_transforms(
    "local-dir:FOLDER") rebuilds with its preprocessing and the Hugging Face hub accepts as it is:
    open_clip_config.json (the model config of load_clip, QuickGELU included, and preprocess_cfg,
    written by open_clip's save_config_for_hf) and open_clip_model.safetensors (the weights, no
    pickle). Returns the weights' path."""
    import importlib
    from pathlib import Path

    import safetensors.torch
    hf = importlib.import_module("open_clip.push_to_hf_hub")  # the module, not the function of that name
    weights = os.path.join(folder, OPEN_CLIP_WEIGHTS)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    write_atomic(os.path.join(folder, OPEN_CLIP_CONFIG), lambda tmp: hf.save_config_for_hf(model, Path(tmp), config))
    return weights


def with_prompts(scenes, path):
    """The scenes with the class names and templates of a --prompts file,
    {"classnames": {folder: name, ...}, "templates": ["a satellite photo of {}.", ...]}; either key
    may be left out to keep the built-in ones. Every class of the data set needs a name."""
    if path is None:
        return scenes
    try:
        with open(path) as f:
            prompts = json.load(f)
        assert isinstance(prompts, dict) and set(prompts) <= {"classnames", "templates"} and prompts
    except OSError as e:
        raise UserError(f"--prompts {path} cannot be read ({e.strerror}); pass a JSON file")
    except (ValueError, AssertionError):
        raise UserError(f"--prompts {path} is not a JSON object with 'classnames' ({{folder: name}}) and/or "
                        f"'templates' ([\"... {{}} ...\"]); fix the file")
    names, templates = prompts.get("classnames"), prompts.get("templates")
    if names is not None:
        missing = [c for c in scenes.classes if not isinstance(names, dict) or not isinstance(names.get(c), str)]
        if missing:
            raise UserError(f"--prompts {path} has no class name for {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                            + f" of {scenes.dataset}; add it under 'classnames'")
        scenes = replace(scenes, classnames=[names[c] for c in scenes.classes])
    if templates is not None:
        if not isinstance(templates, list) or not templates or \
                not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise UserError(f"--prompts {path}: 'templates' must be a list of strings with one '{{}}' each; fix the file")
        scenes = replace(scenes, templates=tuple(templates))
    return scenes


def trained_scenes(record):
    """The scene set (scene_set) a patched.json or student record was trained on."""
    return record.get("scenes") or scene_set(record["dataset"], record.get("root") or DATA[record["dataset"]].root or "")


def trained_on(record, scenes):
    """Whether a checkpoint (its patched.json or student record) was trained on these scenes: the
    same scene set (scene_set), or the same folder read under another data-set name (e.g. a
    RESISC45 folder as --data folder). Scene ids alone do not decide: another folder may name its
    files as EuroSAT does."""
    return trained_scenes(record) == scene_set(scenes.dataset, scenes.root) or \
        (bool(record.get("root")) and os.path.realpath(record["root"]) == os.path.realpath(scenes.root))


def head_prompts(scenes, records=(), path=None):
    """The scenes with the prompts their zero-shot head is built from: a --prompts file when one is
    given; else those of the first record (a patched.json or student record that was trained on
    these scenes, see trained_on) with the same classes: a checkpoint meets its own data with the
    prompts it was trained with; else the data set's own class names and templates."""
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


def zeroshot_score(logits, labels):
    """The validation metric of zero-shot logits: ('acc', top-1 accuracy) for one class per image,
    ('map', mean average precision) for (N, C) 0/1 multi-label targets."""
    if labels.ndim == 2:
        return "map", mean_average_precision(logits, labels)[0]
    return "acc", (logits.argmax(1) == labels).float().mean().item()


class Student(torch.nn.Module):
    """The Sentinel-2 encoder: a timm backbone with a len(S2_BANDS)-band patch embedding, its
    pooled features, then a linear projection to CLIP's embedding size."""

    def __init__(self, arch, embed_dim, input_size=None, in_chans=len(S2_BANDS)):
        super().__init__()
        import timm
        cfg = timm.get_pretrained_cfg(arch)
        if cfg is None:
            raise UserError(f"--student {arch} is not a timm model; see timm.list_models(), e.g. vit_small_patch16_224")
        default_size = cfg.input_size[-1]
        self.input_size = input_size or default_size
        size = {"img_size": self.input_size} if self.input_size != default_size else {}
        try:
            self.backbone = timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=0, **size)
        except TypeError:  # a CNN has no fixed input size: it takes any --input-size as it is
            self.backbone = timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=0)
        self.proj = torch.nn.Linear(self.backbone.num_features, embed_dim)

    def forward(self, x):
        return self.proj(self.backbone(x))


def student_record(student, arch, teacher_meta, teacher_path, scenes):
    """Everything stage 3 needs to rebuild a student, find its teacher and know which scenes and
    prompts it was aligned with (weights_only-safe)."""
    return {"kind": "rsclip-align/student", "arch": arch, "bands": list(S2_BANDS),
            "in_chans": len(S2_BANDS), "input_size": student.input_size, "embed_dim": student.proj.out_features,
            "normalisation": {"reflectance_scale": REFLECTANCE_SCALE, "clip": [0.0, 1.0]},
            "teacher": {"path": os.path.abspath(teacher_path), "model": teacher_meta["model"],
                        "weights_sha256": teacher_meta["weights_sha256"]},
            "dataset": scenes.dataset, "root": os.path.abspath(scenes.root),
            "scenes": scene_set(scenes.dataset, scenes.root), "split_seed": scenes.seed, "classes": scenes.classes,
            "classnames": list(scenes.classnames), "templates": list(scenes.templates),
            "state_dict": student.state_dict()}


def load_student(path):
    """A student saved by stage 2, rebuilt, in eval mode; returns (student, record)."""
    record = load_torch(path, "student checkpoint", "pass a student.pt written by 02_align_s2.py")
    if not isinstance(record, dict) or record.get("kind") != "rsclip-align/student":
        raise UserError(f"{path} is not a student checkpoint of 02_align_s2.py; pass its OUT/student.pt")
    try:
        student = Student(record["arch"], record["embed_dim"], record["input_size"], record["in_chans"])
        student.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path} does not rebuild its student ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                        f"pass a student.pt written by this version of 02_align_s2.py")
    return student.eval(), record


PATCHED_HINT = "the run folder of 01_patch_clip.py (it holds patched.json, open_clip_config.json and the weights)"


def patched_folder(path, flag="--teacher"):
    """Stage 1's run folder from --teacher/--ckpt: the folder itself or any file of it."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.exists(path) or not os.path.isfile(os.path.join(folder, "patched.json")):
        what = "does not exist" if not os.path.exists(path) else "is not a stage-1 output (no patched.json)"
        raise UserError(f"{flag} {path} {what}; pass {PATCHED_HINT}")
    return folder


def load_teacher(path, device, flag="--teacher"):
    """A patched CLIP of stage 1, its metadata (patched.json) and tokenizer. It is rebuilt by
    open_clip from the folder ("local-dir:"), so its architecture and preprocessing are the ones
    stage 1 recorded in open_clip_config.json, whatever tag or file it started from."""
    folder = patched_folder(path, flag)
    try:
        meta = json.load(open(os.path.join(folder, "patched.json")))
        assert meta["kind"] == "rsclip-align/patched-clip"
    except Exception:
        raise UserError(f"{flag} {path}: {folder}/patched.json is not the metadata of a patched CLIP; pass {PATCHED_HINT}")
    weights = os.path.join(folder, OPEN_CLIP_WEIGHTS)
    if not os.path.isfile(weights) or sha256_of(weights) != meta["weights_sha256"]:
        raise UserError(f"{weights} is missing or differs from the weights recorded in {folder}/patched.json; "
                        f"re-run 01_patch_clip.py")
    model, tokenizer, _ = load_clip("local-dir:" + folder, None, device)
    return model.eval(), meta, tokenizer


# ============================================================================ run folders


def write_atomic(path, write):
    """Write a file whole or not at all: `write(tmp_path)`, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
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
    with the shortest digits that give back that float32: 0.025, not 0.02500000037252903. Other
    floats are kept exactly."""
    if isinstance(obj, float) and np.isfinite(obj) and float(np.float32(obj)) == obj:
        return float(str(np.float32(obj)))
    if isinstance(obj, dict):
        return {k: tidy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [tidy(v) for v in obj]
    return obj


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(tidy(obj), f, indent=2, sort_keys=True, default=str)
            f.write("\n")
    write_atomic(path, write)


def save_torch(path, obj):
    def write(tmp):
        with open(tmp, "wb") as f:  # through a file object, so the bytes depend on `obj` only
            torch.save(obj, f)
    write_atomic(path, write)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path, row):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = (json.dumps(tidy(row), sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one write of the whole line: runs that share a results log never interleave their lines
        os.write(fd, line)
    finally:
        os.close(fd)


def load_torch(path, what, fix):
    """torch.load(weights_only=True) with one clear line when the file is missing or broken."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"it may be truncated; {fix}")


def check_writable(path, what, flag):
    """That `path` (a folder to make, or a file to create in one) can be written, without writing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing == os.path.abspath(path) and os.path.isfile(existing):
        existing = os.path.dirname(existing)  # an existing file: its folder must take the rename
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is a file" if not os.path.isdir(existing) else "is not writable"
        raise UserError(f"cannot write {what} {path} ({existing} {problem}); pass a writable {flag}")


def check_run_dir(out, finished_file, overwrite=False, resume=False):
    """Before any work, without writing anything: refuse a folder that holds a finished run (unless
    --overwrite), an interrupted run's last.pt that a fresh run would discard (unless --overwrite),
    a --resume without last.pt, and a folder that cannot be made or written."""
    check_writable(out, "the output folder", "--out DIR")
    last = os.path.join(out, "last.pt")
    if os.path.exists(os.path.join(out, finished_file)) and not (overwrite or resume):
        raise UserError(f"{out} already holds a finished run ({finished_file}); pass --overwrite or another --out")
    if resume and not os.path.isfile(last):
        raise UserError(f"nothing to resume: {last} does not exist; drop --resume to start afresh")
    if os.path.isfile(last) and not (resume or overwrite):
        raise UserError(f"{out} holds an interrupted run ({last}); pass --resume to continue it, "
                        f"--overwrite to start afresh, or another --out")


def lock_run_dir(session, out, resume=False, stale=("last.pt", "log.jsonl")):
    """Once every input is checked: make the run folder and take it for this process alone (an
    flock on out/.lock, released when the process ends, killed or not); a fresh run then removes
    what an earlier run left to resume from, so that --resume can only ever continue this run."""
    import fcntl
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{out} is in use by another run ({owner}); wait for it to end or pass another --out")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    session.locks.append(lock)
    if not resume:
        for name in stale:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))


def unmake_run_dir(out, finished_file):
    """Undo lock_run_dir for a run that stopped on an error before it finished: remove its args.json
    and lock, and the folder when nothing else is in it."""
    if os.path.exists(os.path.join(out, finished_file)):
        return
    for name in ("args.json", ".lock"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)


def describe_run(args, device):
    """The run's sorted arguments, versions, device and git revision for args.json (DINO-style);
    prints one compact line of them."""
    import open_clip
    import timm
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:
        git = ""
    info = {"args": dict(sorted(vars(args).items())), "device": str(device), "git": git or "unknown",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
                         "timm": timm.__version__, "numpy": np.__version__}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    versions = " ".join(f"{k} {info['versions'][k]}" for k in ("torch", "open_clip", "timm"))
    where = f" | run folder {args.out} (flags in args.json)" if getattr(args, "out", None) else ""
    print(f"device {info.get('gpu', info['device'])} | {versions} | git {info['git']}{where}")
    return info


RESUME_MAY_CHANGE = {"resume", "overwrite", "debug", "workers", "device", "save_every", "cache", "no_plots"}


def settings(args):
    """The flags that shape a run's results, as plain values: what a --resume must keep."""
    plain = json.loads(json.dumps(vars(args), default=str))
    return {k: v for k, v in sorted(plain.items()) if k not in RESUME_MAY_CHANGE}


def save_training_state(out, args, step, epoch, batch_in_epoch, progress, **states):
    """The resumable state of a run as out/last.pt, written atomically so that a crash never leaves a
    broken one: the run's settings, weights, optimizer and scheduler (`states`), the position in the
    data (epoch, batches done in it), the RNG, and `progress` (plain values: the epoch's running
    loss sums, the epoch log, and what the stage did after training)."""
    save_torch(os.path.join(out, "last.pt"), {
        "settings": settings(args), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
        "progress": progress, "torch_rng": torch.get_rng_state(), **{k: v.state_dict() for k, v in states.items()}})


def load_training_state(out, args, **states):
    """Restore what save_training_state() wrote, after checking that this command has the settings
    last.pt was saved with (so a resume provably continues that run); returns (step, epoch,
    batch_in_epoch, progress)."""
    ckpt = load_torch(os.path.join(out, "last.pt"), "resume checkpoint", "drop --resume to start afresh")
    saved, now = ckpt.get("settings", {}), settings(args)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        raise UserError(f"--resume with other settings than {out}/last.pt was saved with: "
                        + ", ".join(f"--{k.replace('_', '-')} was {saved.get(k)}" for k in changed)
                        + "; resume with the flags the run was started with")
    try:
        for k, v in states.items():
            v.load_state_dict(ckpt[k])
        progress = ckpt["progress"]
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{out}/last.pt does not match this run ({type(e).__name__}: {str(e)[:160]}); "
                        f"resume with the flags it was started with, or drop --resume")
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], progress


def stop_note(out, script, argv=None):
    """Session.on_stop of a training stage once its run folder is taken: after a stop, the command
    that continues the run when last.pt exists, else that the same command starts it again."""
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in [os.path.basename(script), *argv] if a not in ("--resume", "--overwrite"))

    def note():
        if os.path.isfile(os.path.join(out, "last.pt")):
            return f"saved {out}/last.pt; resume with: python {command} --resume"
        return f"no training step had finished, nothing to resume; run the same command again"
    return note


def checkpoint_step(session, out, args, step, epoch, batch_in_epoch, progress, **states):
    """After a training step: last.pt every --save-every steps, and after Ctrl-C or SIGTERM (then stop)."""
    if step % args.save_every == 0 or session.stop_requested:
        save_training_state(out, args, step, epoch, batch_in_epoch, progress, **states)
    if session.stop_requested:
        raise Interrupted(f"{session.stop_requested} at step {step}")


def end_epoch(out, args, row, step, epoch, batch_in_epoch, progress, **states):
    """An epoch's row into the run's log (OUT/log.jsonl and last.pt); its running sums start again at 0."""
    progress["history"].append(row)
    write_jsonl(os.path.join(out, "log.jsonl"), progress["history"])
    progress["running"] = {k: type(v)(0) for k, v in progress["running"].items()}
    save_training_state(out, args, step, epoch, batch_in_epoch, progress, **states)


def write_jsonl(path, rows):
    """A whole JSON-lines file, written atomically (a run's per-epoch log)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(tidy(row), sort_keys=True, default=str) + "\n" for row in rows)
    write_atomic(path, write)


def cosine_schedule(optimizer, total_steps, warmup_steps):
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine decay to 0 (torch's schedulers)."""
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = sched.LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def check_finite(loss, step, out):
    if not torch.isfinite(loss):
        kept = f"the last good checkpoint {out}/last.pt is kept" if os.path.exists(
            os.path.join(out, "last.pt")) else "no checkpoint was written yet"
        raise UserError(f"loss became {loss.item()} at step {step}; {kept}; lower --lr or check the data")


# ============================================================================ plots
#
# The pictures of a run, drawn only from the JSON files the run wrote (metrics.json; stage 3's
# modality_gap_pca.json too) and written next to them, so that anyone can redraw or restyle them:
#     python -c "import common; common.plot_run('runs/patch')"
# matplotlib is optional (not in requirements.txt) and is imported only in here. Its Figure class
# draws PNGs without pyplot, so no backend or other global state is set. Each picture has a fixed
# size (FIGURE_INCHES at PLOT_DPI; no tight bounding box); colours are tab10, colour-blind safe.

PLOT_DPI = 100  # pixels per inch
FIGURE_INCHES = {"alpha.png": (8.0, 3.8), "training.png": (9.0, 3.0), "modality_gap.png": (9.0, 4.6),
                 "confusion.png": (9.0, 5.0), "per_class_ap.png": (8.0, 6.0), "summary.png": (8.0, 4.0)}
PICTURES = ("alpha.png", "training.png", "modality_gap.png", "confusion.png", "per_class_ap.png")  # of a run
PCA_JSON = "modality_gap_pca.json"
PCA_MAX_SCENES = 2000  # scenes projected and stored for modality_gap.png, evenly spaced over the split
PAIRS_DRAWN = 12  # true pairs joined by a line in modality_gap.png
ENCODER_NAMES = {"clip_rgb": "CLIP on RGB", "student_ms": "student on 13-band MS"}
METRIC_LABELS = {"acc": "top-1 accuracy (%)", "map": "mAP (%)"}
REDRAW = "python -c \"import common; common.plot_run('{}')\""


def principal_components(x, k=2):
    """PCA of the rows of x (N, D) by the SVD of the centred matrix, x - mean = U S V^T: returns the
    coordinates (x - mean) V_k (N, k) and the fraction of the total variance each of the k components
    explains, S_i^2 / sum S^2. A component is defined only up to its sign; the convention here (as
    sklearn's svd_flip on V) makes the largest-magnitude entry of each row of V^T positive."""
    x = x.double()
    centred = x - x.mean(dim=0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    vt = vt[:k]
    vt = vt * torch.sign(vt.gather(1, vt.abs().argmax(dim=1, keepdim=True)))
    return centred @ vt.T, s[:k] ** 2 / (s ** 2).sum()


def modality_gap_pca(features, max_scenes=PCA_MAX_SCENES):
    """The data of modality_gap.png, from stage 3's embeddings {encoder: (N, D)}: up to max_scenes
    test scenes (evenly spaced; 'index' holds their rows), and for 'before' (the untrained student,
    student_init_ms) and 'after' alignment (student_ms): the normalised teacher RGB and student MS
    embeddings of those scenes stacked, projected on the 2 principal components of that stack
    ('rgb', 'ms': (n, 2) each, row i the same scene) and their 'explained_variance_ratio'. None
    without a student."""
    if "student_ms" not in features:
        return None
    n = len(features["clip_rgb"])
    index = torch.linspace(0, n - 1, min(n, max_scenes)).round().long()
    rgb = F.normalize(features["clip_rgb"][index].double(), dim=-1)
    data = {"index": index.tolist(), "n_scenes": n}
    for when, name in (("before", "student_init_ms"), ("after", "student_ms")):
        if name in features:
            ms = F.normalize(features[name][index].double(), dim=-1)
            coords, ratio = principal_components(torch.cat([rgb, ms]))
            data[when] = {"rgb": coords[:len(index)].float().tolist(), "ms": coords[len(index):].float().tolist(),
                          "explained_variance_ratio": ratio.tolist()}
    return data


def save_modality_gap_pca(out, features):
    """OUT/modality_gap_pca.json (modality_gap_pca(), on one line: it holds thousands of points);
    an earlier run's file is removed when this run has no student."""
    path, data = os.path.join(out, PCA_JSON), modality_gap_pca(features)
    if data is None:
        if os.path.exists(path):
            os.remove(path)
        return

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(tidy(data), f, sort_keys=True)
            f.write("\n")
    write_atomic(path, write)


def have_matplotlib():
    """Whether matplotlib can be imported (it is optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(name, ncols=1, **subplots):
    """An empty Figure of FIGURE_INCHES[name] at PLOT_DPI with `ncols` axes side by side: (figure, axes)."""
    import matplotlib  # noqa: F401  (matplotlib itself first: fails as it should when it is missing)
    from matplotlib.figure import Figure
    figure = Figure(figsize=FIGURE_INCHES[name], dpi=PLOT_DPI, layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False, **subplots)[0]


def read_json(path):
    """A JSON file a stage wrote."""
    with open(path) as f:
        return json.load(f)


def percent(values):
    """Fractions as percent; None (a NaN in the JSON) stays None, a gap in the line."""
    return [None if v is None else 100 * v for v in values]


def epoch_axis(ax, epochs):
    """x axis of whole epochs, as numbered in log.jsonl (from 0), at most about 10 ticks."""
    first, last = min(epochs), max(epochs)
    ax.set_xticks(range(first, last + 1, max(1, math.ceil((last - first + 1) / 10))))
    ax.set_xlim(first - 0.5, last + 0.5)
    ax.set_xlabel("epoch")


def plot_alpha(folder):
    """alpha.png of a stage-1 run, from metrics.json. Left: the task's validation metric and, with a
    control task, its zero-shot metric against alpha ('alphas' rows: task_acc or task_map,
    control_acc or control_map), the chosen alpha ('chosen_alpha') dashed, the zero-shot (alpha 0)
    and fine-tuned (alpha 1) ends labelled. Right: the mean training loss of each epoch ('epochs'
    rows: train_loss)."""
    m = read_json(os.path.join(folder, "metrics.json"))
    figure, (curve, loss) = new_figure("alpha.png", ncols=2)
    rows = sorted(m["alphas"], key=lambda r: r["alpha"])
    keys = sorted((k for k in rows[0] if k != "alpha"), reverse=True)  # task_<metric>, then control_<metric>
    for key, colour in zip(keys, ("tab:blue", "tab:orange")):
        label = f"control ({m['control']})" if key.startswith("control") else "task"
        curve.plot([r["alpha"] for r in rows], percent(r[key] for r in rows), "o-", color=colour, label=label)
    how = "best mean of task and control" if m["control"] else "--alpha, no control task"
    curve.axvline(m["chosen_alpha"], color="0.3", ls="--", lw=1, label=f"chosen alpha {m['chosen_alpha']:g} ({how})")
    curve.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0\nzero-shot", "0.25", "0.5", "0.75", "1\nfine-tuned"])
    curve.set_xlim(-0.05, 1.05)
    curve.set_xlabel("alpha, the weight of the fine-tuned image tower")
    metrics = {METRIC_LABELS[k.split("_", 1)[1]] for k in keys}
    curve.set_ylabel(metrics.pop() if len(metrics) == 1 else "accuracy or mAP (%)")
    curve.set_title("PAINT: zero-shot on the validation splits")
    figure.legend(*curve.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    epochs = [r["epoch"] for r in m["epochs"]]
    loss.plot(epochs, [r["train_loss"] for r in m["epochs"]], "o-", color="tab:blue")
    epoch_axis(loss, epochs)
    loss.set_ylabel("binary cross-entropy" if keys[0] == "task_map" else "cross-entropy")
    loss.set_title("fine-tuning loss (mean over the epoch)")
    return figure


def plot_training(folder):
    """training.png of a stage-2 run, from metrics.json 'epochs' rows: the MSE to the teacher's
    embeddings (train_mse, the mean over the epoch's batches; val_mse, after the epoch), the
    text-head loss (train_ce), and the student's zero-shot metric on the validation split (val_acc,
    or val_map for multi-label data)."""
    rows = read_json(os.path.join(folder, "metrics.json"))["epochs"]
    epochs = [r["epoch"] for r in rows]
    metric = "map" if "val_map" in rows[0] else "acc"
    figure, (mse, ce, score) = new_figure("training.png", ncols=3)
    mse.plot(epochs, [r["train_mse"] for r in rows], "o-", color="tab:blue", label="train")
    mse.plot(epochs, [r["val_mse"] for r in rows], "s--", color="tab:orange", label="validation")
    mse.set(ylabel="MSE to the teacher's embedding", title="alignment loss")
    mse.legend(fontsize=8)
    ce.plot(epochs, [r["train_ce"] for r in rows], "o-", color="tab:blue", label="train")
    ce.set(ylabel="binary cross-entropy" if metric == "map" else "cross-entropy", title="text-head loss (train)")
    score.plot(epochs, percent(r[f"val_{metric}"] for r in rows), "s--", color="tab:orange")
    score.set(ylabel=METRIC_LABELS[metric], title="zero-shot (validation)")
    for ax in (mse, ce, score):
        epoch_axis(ax, epochs)
    return figure


def gap_title(when, gap):
    """The panel title of modality_gap.png: metrics.json's modality gap numbers (in all D dimensions)."""
    number = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"{when} alignment\ncentroid distance {number(gap['centroid_distance'])}; mean cosine of\n"
            f"true pairs {number(gap['true_pair_cosine'])}, random pairs {number(gap['random_pair_cosine'])}")


def plot_modality_gap(folder):
    """modality_gap.png of a stage-3 run of a student: the normalised test embeddings of the teacher
    (RGB) and the student (MS) on the 2 principal components of both together (modality_gap_pca.json:
    'before' and 'after' -> 'rgb', 'ms', 'explained_variance_ratio'), before and after alignment side
    by side, grey lines joining a few true pairs, crosses at the two centroids; titles from
    metrics.json 'metrics' -> 'modality_gap' -> 'before' / 'after'."""
    pca = read_json(os.path.join(folder, PCA_JSON))
    gap = read_json(os.path.join(folder, "metrics.json"))["metrics"]["modality_gap"]
    panels = [when for when in ("before", "after") if when in pca]
    figure, axes = new_figure("modality_gap.png", ncols=len(panels))
    for ax, when in zip(axes, panels):
        rgb, ms = np.array(pca[when]["rgb"]), np.array(pca[when]["ms"])
        joined = np.unique(np.linspace(0, len(rgb) - 1, min(len(rgb), PAIRS_DRAWN)).round().astype(int))
        lines = ax.plot(np.stack([rgb[joined, 0], ms[joined, 0]]), np.stack([rgb[joined, 1], ms[joined, 1]]),
                        color="0.6", lw=0.8, zorder=1)
        lines[0].set_label("true pairs")
        for points, colour, label in ((rgb, "tab:blue", "teacher, RGB"), (ms, "tab:orange", "student, MS")):
            ax.scatter(points[:, 0], points[:, 1], s=10, color=colour, alpha=0.6, lw=0, label=label, zorder=2)
            ax.scatter(*points.mean(axis=0), s=90, marker="X", color=colour, edgecolor="black", zorder=3)
        ratio = pca[when]["explained_variance_ratio"]
        ax.set(xlabel=f"PC 1 ({100 * ratio[0]:.0f}% of variance)", ylabel=f"PC 2 ({100 * ratio[1]:.0f}% of variance)",
               title=gap_title(when, gap[when]))
        ax.title.set_fontsize(9)
        ax.set_aspect("equal", adjustable="datalim")  # distances on the page are distances in the plane
    from matplotlib.lines import Line2D
    centroid = Line2D([], [], ls="", marker="X", markersize=9, color="0.6", markeredgecolor="black", label="centroids")
    figure.legend(handles=[*axes[0].get_legend_handles_labels()[0], centroid], loc="outside lower center", ncols=4,
                  fontsize=8)
    figure.suptitle(f"modality gap: normalised test embeddings, {len(pca['index'])} scenes, PCA of both modalities")
    return figure


def plot_confusion(folder):
    """confusion.png of a stage-3 run on single-label data: each evaluated encoder's zero-shot
    confusion matrix (metrics.json 'metrics' -> 'zeroshot' -> encoder -> 'confusion_matrix':
    counts[i][j] = test images of class i predicted as class j), each row divided by the images of
    its class, so the diagonal is the per-class recall; the counts are written in the cells of up
    to 12 classes."""
    zeroshot = read_json(os.path.join(folder, "metrics.json"))["metrics"]["zeroshot"]
    encoders = [name for name, m in zeroshot.items() if "confusion_matrix" in m]
    figure, axes = new_figure("confusion.png", ncols=len(encoders), sharey=True)
    for ax, name in zip(axes, encoders):
        matrix = zeroshot[name]["confusion_matrix"]
        counts, classes = np.array(matrix["counts"]), matrix["classes"]
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        if len(classes) <= 12:
            for (i, j), count in np.ndenumerate(counts):
                ax.text(j, i, count, ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
        ax.set_yticks(ticks, classes, fontsize=7)
        ax.set(xlabel="predicted class", title=f"{ENCODER_NAMES.get(name, name)}, zero-shot: top-1 "
                                               f"{100 * zeroshot[name]['acc1']:.1f}%")
        ax.title.set_fontsize(10)
    axes[0].set_ylabel("true class (test split)")
    figure.colorbar(image, ax=list(axes), shrink=0.7, label="fraction of the true class's images")
    return figure


def plot_per_class_ap(folder):
    """per_class_ap.png of a stage-3 run on multi-label data: each evaluated encoder's zero-shot
    average precision per class as grouped horizontal bars (metrics.json 'metrics' -> 'zeroshot' ->
    encoder -> 'per_class_ap'; a class without positive test images has no bar, but a note), and
    its mAP."""
    zeroshot = read_json(os.path.join(folder, "metrics.json"))["metrics"]["zeroshot"]
    encoders = [name for name, m in zeroshot.items() if "per_class_ap" in m]
    classes = list(zeroshot[encoders[0]]["per_class_ap"])
    figure, (ax,) = new_figure("per_class_ap.png")
    height = 0.8 / len(encoders)
    for k, (name, colour) in enumerate(zip(encoders, ("tab:blue", "tab:orange", "tab:green"))):
        aps = [zeroshot[name]["per_class_ap"][c] for c in classes]
        ax.barh(np.arange(len(classes)) + k * height, [np.nan if v is None else 100 * v for v in aps], height,
                color=colour, label=f"{ENCODER_NAMES.get(name, name)} (mAP "
                                    f"{100 * zeroshot[name]['mean_average_precision']:.1f}%)")
    for i, c in enumerate(classes):
        if all(zeroshot[name]["per_class_ap"][c] is None for name in encoders):
            ax.text(1, i + 0.4 - height / 2, "no positive test images", fontsize=7, color="0.4", va="center")
    ax.set_yticks(np.arange(len(classes)) + 0.4 - height / 2,
                  [c if len(c) <= 40 else c[:38] + "..." for c in classes], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="average precision (%)", title="zero-shot average precision per class (test split)")
    ax.legend(fontsize=8)
    return figure


def plot_summary(path, models, settings, values):
    """The paper's table (03_eval.py --summary-plot FILE) as grouped bars: one group per evaluation
    setting (data set and split), one bar per model, its zero-shot top-1 accuracy (mAP for
    multi-label data) in % (values[model][setting], None where the model was not evaluated)."""
    figure, (ax,) = new_figure("summary.png")
    width = 0.8 / len(models)
    for k, (model, row) in enumerate(zip(models, values)):
        bars = ax.bar(np.arange(len(settings)) + (k - (len(models) - 1) / 2) * width,
                      [np.nan if v is None else v for v in row], width, label=model, color=f"C{k % 10}")
        ax.bar_label(bars, ["" if v is None else f"{v:.1f}" for v in row], fontsize=7)
    ax.set_xticks(np.arange(len(settings)), settings, fontsize=8)
    ax.set(ylabel="zero-shot top-1 accuracy or mAP (%)", ylim=(0, 100),
           title="zero-shot classification (the results log's table)")
    figure.legend(loc="outside lower center", ncols=min(3, len(models)), fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=PLOT_DPI))


def pictures(folder):
    """The pictures the JSON in a run folder supports: {file name: function drawing its Figure}."""
    path = os.path.join(folder, "metrics.json")
    m = read_json(path) if os.path.isfile(path) else {}
    zeroshot = m.get("metrics", {}).get("zeroshot", {})
    drawers = {"alpha.png": plot_alpha if "alphas" in m else None,
               "training.png": plot_training if "epochs" in m and "alphas" not in m else None,
               "modality_gap.png": plot_modality_gap if os.path.isfile(os.path.join(folder, PCA_JSON)) else None,
               "confusion.png": plot_confusion if any("confusion_matrix" in z for z in zeroshot.values()) else None,
               "per_class_ap.png": plot_per_class_ap if any("per_class_ap" in z for z in zeroshot.values()) else None}
    return {name: draw for name, draw in drawers.items() if draw is not None}


def plot_run(folder):
    """Draw every picture the JSON in a run folder supports, next to it, and return their paths:
    stage 1 alpha.png, stage 2 training.png, stage 3 confusion.png (per_class_ap.png for multi-label
    data) and, for a student, modality_gap.png. Needs matplotlib (pip install matplotlib)."""
    drawers = pictures(folder)
    if not drawers:
        raise ValueError(f"{folder} holds no metrics.json of an rsclip-align stage to draw from")
    paths = []
    for name, draw in drawers.items():
        figure = draw(folder)
        paths.append(os.path.join(folder, name))
        write_atomic(paths[-1], lambda tmp: figure.savefig(tmp, format="png", dpi=PLOT_DPI))
    return paths


def draw_pictures(out, session, draw=True):
    """A stage's last step, once everything is saved: remove the pictures an earlier run left in
    `out`, then (unless --no-plots, draw=False) draw this run's from its JSON (plot_run). Without
    matplotlib, or when drawing fails, one printed line: a picture never costs a finished run
    (with --debug a failure shows its traceback)."""
    for name in PICTURES:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if not draw:
        return
    names = ", ".join(pictures(out))
    session.on_stop = f"the run is saved, its pictures are not; draw them with: {REDRAW.format(out)}"
    if not have_matplotlib():
        print(f"plots: matplotlib is not installed; pip install matplotlib to get {names} (or pass --no-plots)")
        return
    try:
        paths = plot_run(out)
    except Interrupted:
        raise
    except Exception as e:
        if session.debug:
            raise
        print(f"plots: could not draw {names} ({type(e).__name__}: {str(e)[:160]}); the run is saved; "
              f"redraw with: {REDRAW.format(out)}")
        return
    print(f"plots: wrote {', '.join(paths)}")
