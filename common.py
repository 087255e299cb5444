"""What two or more stages of rsclip-align share, paper first:

  the method  the zero-shot head and its logits, the RGB composite, average precision
  models      open_clip loading, the student, embedding a split, the training step's helpers
  inputs      each encoder's input from a raw batch, computed on the device
  data        the data-set table, listers, splits, readers, packed cache, batches
  runs        run flags, one-line errors, run folders, checkpoints, JSON, pictures (plumbing)
"""
import argparse
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
    """Bad input the user can fix: one line naming the file or flag and the fix; exit code 2."""


# ============================================================================ the method

# Sentinel-2 band order of the EuroSAT MS GeoTIFFs (B8A last): the student's input order.
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12",
            "B8A")
RGB_BANDS = ("B04", "B03", "B02")  # red, green, blue
# Band order of the SSL4EO-S12 L1C pretraining data (B8A right after B08).
SSL4EO_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
                "B11", "B12")


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames, templates, device):
    """The zero-shot head W (embed_dim, classes): for each class c,
        w_c = normalise( mean_t normalise( text_encoder(template_t(c)) ) ),
    open_clip's build_zero_shot_classifier (Radford et al. 2021, Sec. 3.1.4)."""
    from open_clip import build_zero_shot_classifier
    model.eval()
    return build_zero_shot_classifier(model, tokenizer, list(classnames), list(templates),
                                      num_classes_per_batch=10, device=device).float()


def zeroshot_logits(features, head, log_logit_scale):
    """Class logits of image embeddings: exp(tau) * normalise(f) @ W, tau = log_logit_scale on
    the log scale, as open_clip stores it (model.logit_scale: log 100 = 4.6 for OpenAI's CLIP);
    an exponentiated scale (100) is refused."""
    if (tau := float(log_logit_scale.detach())) > 10:  # exp(10) = 22026: no CLIP's temperature
        raise ValueError(f"logit scale {tau:g} looks exponentiated; pass it on the log scale, as "
                         f"open_clip stores it (model.logit_scale)")
    return log_logit_scale.exp() * F.normalize(features.float(), dim=-1) @ head


def rgb_composite(ms, rgb_max):
    """The RGB composite of Sentinel-2 digital numbers: B04, B03, B02 times 255/rgb_max, clipped
    to [0, 255] and truncated to whole grey levels, as the uint8 EuroSAT RGB release (rgb_max:
    3558 for L1C, 2000 for L2A). ms: (B, 13, H, W) in S2_BANDS order -> (B, 3, H, W), 0..255."""
    rgb = ms[:, [S2_BANDS.index(b) for b in RGB_BANDS]]
    # times 255, then / rgb_max: exact in float32 (* (255 / 3558) gives 254.99998 at 3558)
    return torch.floor(torch.clamp(rgb * 255.0 / rgb_max, 0, 255))


def average_precision(scores, positives):
    """Average precision (sklearn's average_precision_score): AP = sum_n (R_n - R_{n-1}) P_n over
    the distinct scores n in decreasing order (tied scores are one threshold), P_n and R_n the
    precision and recall of the images scoring >= n. NaN when there are no positives."""
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
    """Mean average precision of multi-label data (CLIP_benchmark's): the AP of each class's
    column of scores against its 0/1 targets, averaged over the classes with a positive.
    Returns (mAP, per-class APs)."""
    aps = torch.tensor([average_precision(scores[:, c], targets[:, c])
                        for c in range(scores.shape[1])])
    return aps.nanmean().item(), aps


def zeroshot_score(features, labels, head, logit_scale):
    """Zero-shot score of embeddings through a head: ('acc', top-1 accuracy), or ('map', mean
    average precision) for (N, C) 0/1 multi-label targets."""
    logits = zeroshot_logits(features, head.float().cpu(), logit_scale.detach().float().cpu())
    if labels.ndim == 2:
        return "map", mean_average_precision(logits, labels)[0]
    return "acc", (logits.argmax(1) == labels).float().mean().item()


# ============================================================================ models


def pick_device(name=None):
    """--device, or CUDA when there is one."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name} is not a torch device; pass cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU here; drop --device or pass cpu")
    return device


def autocast(device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_finite(loss, step):
    if not torch.isfinite(loss):
        raise UserError(f"loss became {loss.item()} at step {step}; check the data, or start "
                        f"afresh with a lower --lr (--overwrite)")


def cosine_schedule(optimizer, total_steps, warmup_steps):
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine decay to 0."""
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = sched.LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    return sched.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def training_steps(n_images, args, warmup_default):
    """(steps per epoch, total steps, warm-up steps) from a training stage's flags: --warmup,
    or warmup_default capped at a tenth of the run."""
    per_epoch = training_batches(n_images, args.batch_size)
    total = min(args.epochs * per_epoch,
                args.max_steps if args.max_steps is not None else math.inf)
    warmup = min(args.warmup, total) if args.warmup is not None else \
        min(warmup_default, total // 10)
    return per_epoch, total, warmup


class Student(torch.nn.Module):
    """The Sentinel-2 encoder: a timm backbone with an in_chans-band patch embedding, its pooled
    features, then a linear projection to CLIP's embedding size."""

    def __init__(self, arch, embed_dim, input_size=None, in_chans=len(S2_BANDS),
                 drop_path_rate=0.0):
        super().__init__()
        import timm
        cfg = timm.get_pretrained_cfg(arch)
        if cfg is None:
            raise UserError(f"--student {arch} is not a timm model; see timm.list_models(), "
                            f"e.g. vit_small_patch16_224")
        self.input_size = input_size or cfg.input_size[-1]
        size = {"img_size": self.input_size} if self.input_size != cfg.input_size[-1] else {}
        kw = dict(pretrained=False, in_chans=in_chans, num_classes=0,
                  drop_path_rate=drop_path_rate)
        try:
            self.backbone = timm.create_model(arch, **kw, **size)
        except TypeError:  # a CNN has no fixed input size: it takes any --input-size
            self.backbone = timm.create_model(arch, **kw)
        self.proj = torch.nn.Linear(self.backbone.num_features, embed_dim)

    def forward(self, x):
        return self.proj(self.backbone(x))


OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's folder format ("local-dir:")
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def load_clip(model_name, pretrained, device="cpu"):
    """An open_clip CLIP, its tokenizer and model config. model_name: an open_clip name or
    'local-dir:FOLDER'; pretrained: an open_clip tag (with its preprocessing and QuickGELU), a
    weights file, or 'none'."""
    import open_clip
    if model_name.startswith("local-dir:"):
        if not os.path.isfile(os.path.join(model_name[len("local-dir:"):], OPEN_CLIP_CONFIG)):
            raise UserError(f"--model {model_name}: no {OPEN_CLIP_CONFIG} there; pass a folder "
                            f"of 01_patch_clip.py or open_clip's save_for_hf")
        model = quietly(open_clip.create_model_and_transforms, model_name, device=device)[0]
        return model, open_clip.get_tokenizer(model_name), open_clip.get_model_config(model_name)
    if model_name not in open_clip.list_models():
        raise UserError(f"--model {model_name} is not an open_clip model; see "
                        f"open_clip.list_models()")
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained != "none" else {}
    if pretrained != "none" and not tag and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise UserError(f"--pretrained {pretrained} is neither a file nor an open_clip tag of "
                        f"{model_name}; tags: {tags}")
    weights = None if pretrained == "none" else \
        tag_weights(model_name, pretrained, tag) if tag else pretrained
    from_tag = {"force_quick_gelu": bool(tag.get("quick_gelu")), "image_mean": tag.get("mean"),
                "image_std": tag.get("std"), "image_interpolation": tag.get("interpolation"),
                "image_resize_mode": tag.get("resize_mode")}
    try:
        model = quietly(open_clip.create_model_and_transforms, model_name, pretrained=weights,
                        device=device, **from_tag)[0]
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if "PytorchStreamReader" in first or "zip archive" in first or "header" in first:
            raise UserError(f"--pretrained {weights} cannot be read (truncated, or not "
                            f"weights); download or save it again")
        raise UserError(f"--pretrained {weights} does not fit {model_name} ({first}); pass the "
                        f"--model it was saved from")
    config = open_clip.get_model_config(model_name)
    if from_tag["force_quick_gelu"]:
        config = {**config, "quick_gelu": True}
    return model, open_clip.get_tokenizer(model_name), config


def quietly(fn, *args, logger=None, **kwargs):
    """Call fn with its logger's warnings silenced (open_clip's 'No pretrained weights loaded')."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return fn(*args, **kwargs)
    finally:
        log.setLevel(level)


def tag_weights(model_name, tag_name, tag):
    """The local file of an open_clip tag's weights: cached, else downloaded; offline, one line
    within seconds."""
    import socket
    from urllib.parse import urlparse

    import huggingface_hub
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, download_pretrained
    hub, url = tag.get("hf_hub", ""), tag.get("url", "")
    repo, filename = os.path.split(hub)
    if hub:
        cached = [huggingface_hub.try_to_load_from_cache(repo, name)
                  for name in ([filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME])]
    else:
        cached = [os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))]
    found = [tag["file"]] if tag.get("file") else \
        [c for c in cached if isinstance(c, str) and os.path.isfile(c)]
    if found:
        return found[0]
    host = "huggingface.co" if hub else urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        quick = f" --model {model_name}-quickgelu" if tag.get("quick_gelu") else ""
        source = f"hf-hub:{repo}" if hub else url
        raise UserError(f"the '{tag_name}' weights of {model_name} are not cached and {host} "
                        f"cannot be reached (offline?); fetch {source} elsewhere and pass "
                        f"--pretrained FILE{quick}, or --pretrained none for random weights")
    return quietly(download_pretrained, tag)


PATCHED_HINT = "the run folder of 01_patch_clip.py (with patched.json and the weights)"


def patched_folder(path, flag="--teacher"):
    """Stage 1's run folder from --teacher/--ckpt: the folder itself or any file of it."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.exists(path) or not os.path.isfile(os.path.join(folder, "patched.json")):
        what = "does not exist" if not os.path.exists(path) else \
            "is not a stage-1 output (no patched.json)"
        raise UserError(f"{flag} {path} {what}; pass {PATCHED_HINT}")
    return folder


def load_teacher(path, device, flag="--teacher", base=(), meta=None):
    """A patched CLIP, its patched.json, tokenizer: stage 1's run folder ("local-dir:"), or a
    released file over its base CLIP (base: model, pretrained)."""
    if released(path):
        meta = meta or released_meta(path, *base)
        clip, tokenizer, _ = load_clip(meta["model"], meta["pretrained"], device)
        n = load_released(clip, path, flag, ("transformer.",))
        print(f"{flag} {path}: ignored optimizer, scaler, {n} keys")
        return clip.eval(), meta, tokenizer
    folder = patched_folder(path, flag)
    try:
        meta = read_json(os.path.join(folder, "patched.json"))
        assert meta["kind"] == "rsclip-align/patched-clip" and not any(base)
    except Exception:
        raise UserError(f"{flag} {path}: {folder}/patched.json is not the metadata of a patched "
                        f"CLIP (or --model given); pass {PATCHED_HINT}")
    weights = os.path.join(folder, OPEN_CLIP_WEIGHTS)
    if not os.path.isfile(weights) or sha256_of(weights) != meta["weights_sha256"]:
        raise UserError(f"{weights} is missing or differs from the weights recorded in "
                        f"{folder}/patched.json; re-run 01_patch_clip.py")
    model, tokenizer, _ = load_clip("local-dir:" + folder, None, device)
    return model.eval(), meta, tokenizer


def trained_scenes(meta, path):
    """Training scenes of a checkpoint (released: presumed)."""
    if meta["kind"] == "rsclip-align/patched-clip":
        return read_scenes(os.path.join(patched_folder(path), meta["train_scenes"]),
                           meta["train_scenes_sha256"])
    return set(meta.get("train_scenes") or
               [patch for patch, split in official_splits().items() if split == "train"])


RELEASED_NAME = re.compile(r"_(paint_(\d)(\d+)|ft_\d+|al_\d+|zs)\.pt$")
STUDENT_KEY = "visual.trunk.patch_embed.proj.weight"
released = lambda path: os.path.isfile(path) and not os.path.isfile(os.path.join(
    os.path.dirname(path) or ".", "patched.json"))


def released_meta(path, model=None, pretrained=None):
    """What stands for patched.json (docs/released.md)."""
    import open_clip
    name, models = os.path.basename(path), open_clip.list_models()
    match = RELEASED_NAME.search(name)
    stem = name[:match.start()] if match else ""
    named = max((m for m in models if stem.startswith(m + "_")), key=len, default="")
    tag = stem[len(named) + 1:]
    model, pretrained = model or named, pretrained or tag
    if not (model and pretrained):
        raise UserError(f"{path}: not {PATCHED_HINT} or a released file's name; pass --model, "
                        f"--pretrained")
    if tag == "openai" and os.path.isfile(pretrained) and f"{model}-quickgelu" in models:
        model += "-quickgelu"
        print(f"{path}: QuickGELU, as open_clip 2.x built 'openai'")
    alpha = match and match.group(2) and float(f"{match.group(2)}.{match.group(3)}") or 0.0
    return {"kind": "released", "model": model, "pretrained": pretrained,
            "alpha": alpha, "dataset": "bigearthnet19", "scenes": "bigearthnet", "split_seed": 0,
            "classes": bigearthnet_nomenclature()["labels19"], "weights_sha256": sha256_of(path)}


def load_released(model, path, what, keep=(), fix="pass its base's --model/--pretrained"):
    """A released file into `model`, strictly but for keys starting with `keep`; returns how many
    it ignored."""
    state, own = load_torch(path, what, "pass their file"), model.state_dict()
    state = state.get("model") if isinstance(state, dict) else None
    if not isinstance(state, dict) or (STUDENT_KEY in state) != (STUDENT_KEY in own):
        raise UserError(f"{what} {path} is not the authors' "
                        f"{'student' if STUDENT_KEY in own else 'CLIP'}; pass one")
    need = [k for k in own if not k.startswith(keep)]
    bad = next((k for k in need if k not in state or state[k].shape != own[k].shape), None)
    if bad:
        found = f"has {tuple(state[bad].shape)} for" if bad in state else "lacks"
        raise UserError(f"{path} {found} {bad} {tuple(own[bad].shape)}; {fix}")
    model.load_state_dict({**own, **{k: state[k] for k in need}})
    return len(state) - len(need)


@torch.no_grad()
def embed(dataset, encoders, device, batch_size=256, workers=0):
    """Every image of a split read once and embedded by each encoder (name -> function of a raw
    batch): ({name: (N, D) float32 on the CPU}, labels, dataset indices)."""
    features, labels, index = {name: [] for name in encoders}, [], []
    for batch in batch_loader(dataset, batch_size, workers=workers,
                              desc=f"embed {dataset.scenes.split}"):
        with autocast(device):
            for name, encode in encoders.items():
                features[name].append(encode(batch["images"]).float().cpu())
        labels.append(batch["labels"])
        index.append(batch["index"])
    return {name: torch.cat(f) for name, f in features.items()}, torch.cat(labels), torch.cat(index)


def clip_encoder(clip, pixels, device):
    """A CLIP's image encoder of raw batches: RGB images, or the RGB composite of S2 bands."""
    cfg = clip.visual.preprocess_cfg
    return lambda raw: clip.encode_image(clip_input(raw, cfg, device, pixels=pixels))


def student_encoder(student, pixels, device):
    """A student's encoder of raw Sentinel-2 (or Sentinel-1) batches."""
    return lambda raw: student(ms_input(raw, student.input_size, device, pixels,
                                        getattr(student, "authors", False)))  # released


# ============================================================================ inputs


def s2_bands(raw, pixels, device):
    """Sentinel-2 digital numbers on one grid in S2_BANDS order, on the device: raw is a (B, h, w,
    bands) batch, or a tuple of them, one per resolution, with the band names pixels.bands; each
    is resampled bilinearly to the finest grid (as torchgeo); missing bands (B10 in L2A) are 0."""
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


def resize_and_crop(x, size, interpolation, clip_to=None, resize_mode="shortest"):
    """open_clip's resize modes on a batch, to `size` (int or (h, w)): 'shortest' (then centre
    crop), 'longest' (then pad with 0) or 'squash'. With `clip_to`, as PIL resamples 8-bit images
    in open_clip's preprocessing: width, then height, clipping each pass."""
    mode = TF.InterpolationMode(interpolation)
    target = (size, size) if isinstance(size, int) else tuple(size)
    h, w = x.shape[-2:]
    if (h, w) == target:
        return x
    if resize_mode == "squash":
        new_h, new_w = target
    elif target[0] == target[1] and resize_mode == "shortest":  # torchvision's Resize(int)
        t = target[0]
        new_h, new_w = (t, int(t * w / h)) if h <= w else (int(t * h / w), t)
    else:
        scale = (max if resize_mode == "shortest" else min)(target[0] / h, target[1] / w)
        new_h, new_w = round(h * scale), round(w * scale)
    if clip_to is None:
        x = TF.resize(x, [new_h, new_w], interpolation=mode, antialias=True)
    else:
        x = TF.resize(x, [h, new_w], interpolation=mode, antialias=True).clamp(*clip_to)
        x = TF.resize(x, [new_h, new_w], interpolation=mode, antialias=True).clamp(*clip_to)
    return TF.center_crop(x, list(target))  # crops, or pads with 0 where the image is smaller


def clip_pixels(raw, preprocess_cfg, device, pixels=None, resize=True):
    """A raw batch as CLIP's pixels in [0, 1]: 8-bit RGB as is, or Sentinel-2 bands through
    rgb_composite; then open_clip's resize and centre crop."""
    if pixels is None:
        x = raw.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        assert x.shape[1] == 3, "Sentinel-2 bands need their data set's pixels="
    else:
        x = rgb_composite(s2_bands(raw, pixels, device), pixels.rgb_max)
    cfg = preprocess_cfg
    return resize_and_crop(x / 255.0, cfg["size"] if resize else x.shape[-2:],
                           cfg["interpolation"], clip_to=(0, 1),
                           resize_mode=cfg.get("resize_mode", "shortest"))


def clip_input(raw, preprocess_cfg, device, pixels=None, augment=None):
    """CLIP's input from a raw batch: clip_pixels (each image of an ImageList alone, as open_clip's
    transform), an optional `augment` of the [0, 1] batch (.crops: as read), then the model's
    normalisation. preprocess_cfg: model.visual.preprocess_cfg, as open_clip's validation transform
    uses it."""
    resize = not getattr(augment, "crops", False)
    if isinstance(raw, ImageList):
        x = [clip_pixels(image[None], preprocess_cfg, device, resize=resize)[0] for image in raw]
        x = torch.stack(x) if resize else x
    else:
        x = clip_pixels(raw, preprocess_cfg, device, pixels, resize)
    if augment is not None:
        x = augment(x)
    return TF.normalize(x, list(preprocess_cfg["mean"]), list(preprocess_cfg["std"]))


def ms_input(raw, size, device, pixels=None, authors=False):
    """The student's input from a raw batch, on the device: the 13 Sentinel-2 bands (s2_bands) as
    reflectance, DN / 10000 clipped to [0, 1], or a Sentinel-1 student's dB z-scored, (dB - mean)
    / std; then a bicubic resize to its input size (`authors`: before, docs/released.md)."""
    pixels = pixels or Pixels((S2_BANDS,), None)
    if authors:
        order = pixels.bands[0] if len(pixels.bands[0]) == 13 else SSL4EO_BANDS
        x = s2_bands(raw, pixels, device)[:, [S2_BANDS.index(b) for b in order]]
        return torch.clamp(resize_and_crop(x, size, "bicubic") * REFLECTANCE_SCALE, 0, 1)
    if pixels.sar:
        k = next(k for k, bands in enumerate(pixels.bands) if bands == tuple(pixels.sar))
        x = parts(raw)[k].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        mean, std = (torch.tensor(v, device=device)[:, None, None]
                     for v in zip(*pixels.sar.values()))
        x = (x - mean) / std
    else:
        x = torch.clamp(s2_bands(raw, pixels, device) * REFLECTANCE_SCALE, 0, 1)
    return resize_and_crop(x, size, "bicubic")


# ============================================================================ data
#
# A data set is one entry of DATA (below): its modality, default root, lister, reader, templates,
# pixel format, official splits and multi-label targets. Stages never branch on a data set's name.

L1C_RGB_MAX = 3558.0  # L1C digital number shown as grey level 255 in the EuroSAT RGB release
L2A_RGB_MAX = 2000.0  # L2A digital number shown as 255 in the official code's BigEarthNet RGB
REFLECTANCE_SCALE = 1.0 / 10000.0  # digital number -> reflectance (L1C TOA, L2A surface)
# BigEarthNet-S2 v1.0 stores each L2A band at its own resolution (no B10): 10 m, 20 m, 60 m.
BIGEARTHNET_BANDS = (("B02", "B03", "B04", "B08"), ("B05", "B06", "B07", "B8A", "B11", "B12"),
                     ("B01", "B09"))
BIGEARTHNET_SIZES = (120, 60, 20)  # pixels a side of each group
# BigEarthNet-S1 v1.0: VV and VH in dB (float32, 120 px), BigEarthNet's published mean and std.
BIGEARTHNET_S1 = {"VV": (-12.620, 5.116), "VH": (-19.290, 5.464)}
# SEN12MS stores 13 L1C bands, B8A after B08.
SEN12MS_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
                 "B11", "B12")
SEN12MS_CLASSES = ("forest", "shrubland", "savanna", "grassland", "wetlands", "croplands",
                   "urban / built-up", "snow / ice", "barren", "water")  # the toolbox's 10 IGBP
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bigearthnet")

# The CLIP paper's EuroSAT class names and templates, keyed by EuroSAT's folder names.
EUROSAT_CLASSNAMES = {
    "AnnualCrop": "annual crop land", "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland", "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings", "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river", "SeaLake": "lake or sea",
}
EUROSAT_TEMPLATES = ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                     "a centered satellite photo of the {}.")
# The CLIP paper's RESISC45 templates; its class names are the folder names with spaces.
RESISC45_TEMPLATES = tuple(f"{view} of {article}{{}}." for article in ("", "a ", "the ")
                           for view in ("satellite imagery", "aerial imagery", "satellite photo",
                                        "aerial photo", "satellite view", "aerial view"))
GENERIC_TEMPLATES = ("a satellite photo of {}.", "a satellite photo of a {}.",
                     "a satellite photo of the {}.")

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}  # without official splits: hashed_split
RGB_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
TIF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Pixels:
    """How an 'ms' data set stores its bands: the band names of each stored array (one per
    resolution), the digital number its RGB composite shows as 255, and for a Sentinel-1 student
    each polarisation's dB (mean, std)."""
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
    left_out: dict = field(default_factory=dict)  # reason -> number of scenes not listed
    unusable: dict = field(default_factory=dict)  # file -> reason found while listing
    aliases: list = None  # each scene's id in the scene set its data set renames

    pixels = property(lambda self: DATA[self.dataset].pixels)
    multilabel = property(lambda self: self.labels is not None and self.labels.ndim == 2)

    @property
    def chance(self):
        """The score of random guesses: top-1 1/C; for multi-label data the mAP of random scores,
        the mean share of positives over the classes that have one."""
        if self.multilabel:
            share = self.labels.mean(axis=0)
            return float(share[share > 0].mean()) if (share > 0).any() else math.nan
        return 1 / len(self.classes)

    def subset(self, indices, split):
        take = lambda values: None if values is None else [values[i] for i in indices]
        return replace(self, files=take(self.files), labels=self.labels[indices], split=split,
                       official_split=take(self.official_split), aliases=take(self.aliases))


def folder_classname(folder):
    """A prompt-ready name of a folder: 'baseball_diamond' / 'SeaLake' -> 'baseball diamond' /
    'sea lake'."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder)
    return spaced.replace("_", " ").replace("-", " ").lower()


# torchgeo's copy of the EuroSAT MS archive (its URL and MD5), and where its class folders lie in it
EUROSAT_MS_ARCHIVE = ("https://hf.co/datasets/torchgeo/eurosat/resolve/"
                      "1ce6f1bfb56db63fd91b6ecc466ea67f2509774c/EuroSATallBands.zip",
                      "5ac12b3b2557aa56e1826e981e8e200e")
EUROSAT_MS_FOLDER = os.path.join("ds", "images", "remote_sensing", "otherDatasets", "sentinel_2",
                                 "tif")


def download_eurosat(root, ms=False):
    """EuroSAT into root: RGB as torchvision downloads it (root/eurosat/2750/), MS as torchgeo's
    archive (root/ds/.../tif/, MD5 checked, the zip removed); nothing is kept when it fails."""
    if ms and any(os.path.isdir(os.path.join(root, p, "Forest")) for p in ("", EUROSAT_MS_FOLDER)):
        return  # there already
    made = next((p for p in (root, os.path.join(root, "eurosat" if not ms else "ds"))
                 if not os.path.exists(p)), None)
    url, md5 = EUROSAT_MS_ARCHIVE
    archive = os.path.join(root, os.path.basename(url))
    try:
        if ms:
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(url, root, md5=md5, remove_finished=True)
        else:
            torchvision.datasets.EuroSAT(root, download=True)
    except Exception as e:
        if made:  # the outermost folder the download made
            shutil.rmtree(made, ignore_errors=True)
        if ms and os.path.exists(archive):
            os.remove(archive)
        layout = f"{EUROSAT_MS_FOLDER}/<Class>/*.tif" if ms else "eurosat/2750/<Class>/*.jpg"
        raise UserError(f"could not download EuroSAT into {root} ({type(e).__name__}: "
                        f"{str(e)[:160]}); nothing was kept; fetch it elsewhere and pass --root "
                        f"DIR holding {layout}")


def list_class_folders(dataset, root, download=False, suffixes=RGB_SUFFIXES,
                       classnames=folder_classname, subfolders=(), fetch=None, sample=None):
    """A class-folder data set: <folder>/<ClassName>/<files>, <folder> the first of `subfolders`
    under root that exists, or root; classnames: a dict or a function of the folder name."""
    if download and fetch:
        fetch(root)
    folder = next((os.path.join(root, s) for s in subfolders
                   if os.path.isdir(os.path.join(root, s))), root)
    if not os.path.isdir(folder):
        hint = (", or --download to fetch it" if fetch else "") + \
            (f" (a sample to try: --root {sample})" if sample else "")
        raise UserError(f"data folder {folder} does not exist; pass --root DIR{hint}")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise UserError(f"{folder} has no class sub-folders; expected "
                        f"{folder}/<ClassName>/<image files>")

    def one_level_up():  # a hint when the data set's folder is a sub-folder of --root
        inner = [os.path.join(folder, c) for c in classes if any(
            os.path.isdir(os.path.join(folder, c, d))
            and (not isinstance(classnames, dict) or d in classnames)
            for d in os.listdir(os.path.join(folder, c)))]
        return f"; --root looks one level too high: pass --root {inner[0]}" if inner else ""
    if isinstance(classnames, dict) and any(c not in classnames for c in classes):
        raise UserError(f"{folder} has folders {[c for c in classes if c not in classnames]} that "
                        f"are not {dataset} classes" + (one_level_up() or "; use --data folder"))
    files, labels = [], []
    for label, name in enumerate(classes):
        listed = sorted(os.listdir(os.path.join(folder, name)))
        names = [f for f in listed if f.lower().endswith(suffixes)]
        if not names:
            rgb = [f for f in listed if f.lower().endswith(RGB_SUFFIXES)]
            hint = (f"its files ({rgb[0]}, ...) look like RGB images: pass --data eurosat or "
                    f"--data folder") if rgb else \
                one_level_up()[2:] or "add its images or remove the folder"
            raise UserError(f"class folder {os.path.join(folder, name)} holds no "
                            f"{'/'.join(suffixes)} files for --data {dataset}; {hint}")
        files += [os.path.join(name, f) for f in names]
        labels += [label] * len(names)
    names = [classnames[c] if isinstance(classnames, dict) else classnames(c) for c in classes]
    return dict(root=folder, classes=classes, classnames=names, files=files,
                labels=np.array(labels, np.int64))


def bigearthnet_nomenclature():
    """The shipped nomenclature.json: the 43 label names in index order, the 19/5-class names, and
    the 43 -> 19/5 maps."""
    return read_json(os.path.join(SHIPPED, "nomenclature.json"))


def official_splits(folder=SHIPPED):
    """patch name -> 'train'/'val'/'test' from the official BigEarthNet-S2 v1.0 lists."""
    import bz2
    splits = {}
    for split in ("train", "val", "test"):
        with bz2.open(os.path.join(folder, f"{split}.csv.bz2"), "rt") as f:
            splits.update((line.strip(), split) for line in f if line.strip())
    return splits


def count(counter, reason):
    counter[reason] = counter.get(reason, 0) + 1


def list_bigearthnet(dataset, root, download=False, n_classes=19, s1=False):
    """BigEarthNet-S2 v1.0: root/BigEarthNet-v1.0/<patch>/<patch>_<band>.tif and its labels json;
    only patches on the official lists with a label among the n_classes are kept. With `s1`,
    BigEarthNet-S1 v1.0 beside it, each patch with its S2 partner's split (docs/data.md)."""
    archive = "BigEarthNet-S1-v1.0" if s1 else "BigEarthNet-v1.0"
    folder = next((p for p in (os.path.join(root, archive), root) if os.path.isdir(p)), root)
    if not os.path.isdir(folder):
        raise UserError(f"data folder {root} does not exist; pass --root DIR holding "
                        f"{archive}/<patch folders>")
    entries = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if (os.path.exists(os.path.join(root, "metadata.parquet")) or "BigEarthNet-S2" in entries
            or any(re.search(r"_N\d{4}_R\d{3}_T\w{5}$", d) for d in entries[:50])):
        raise UserError(f"{root} looks like BigEarthNet v2.0 (reBEN): pass --data "
                        f"bigearthnet19_v2 (or 5_v2, 19_v2_s1), or --root DIR of the v1.0 archive")
    nomenclature = bigearthnet_nomenclature()
    index43 = {name: i for i, name in enumerate(nomenclature["labels43"])}
    classes = nomenclature[f"labels{n_classes}"]
    mapping = {int(k): v for k, v in
               nomenclature.get(f"map43to{n_classes}", {i: i for i in range(43)}).items()}
    split_of = official_splits()
    files, splits, targets, left_out, unusable = [], [], [], {}, {}
    for name in entries:
        if not s1 and name not in split_of:
            count(left_out, "not on the official lists (seasonal snow, cloud or shadow, or not "
                            "BigEarthNet-S2 v1.0)")
            continue
        target, key = np.zeros(len(classes), np.uint8), name
        path = os.path.join(folder, name, f"{name}_labels_metadata.json")
        try:
            with open(path) as f:
                meta = json.load(f)
            key = meta["corresponding_s2_patch"] if s1 else name  # S1: its partner's split
            unknown = [n for n in meta["labels"] if n not in index43]
            if unknown:
                raise ValueError(f"has label {unknown[0]!r}, not a BigEarthNet-v1.0 name")
            target[[mapping[index43[n]] for n in meta["labels"] if index43[n] in mapping]] = 1
        except (OSError, ValueError, KeyError, TypeError) as e:
            unusable[name] = f"{path}: {e}" if isinstance(e, ValueError) and "label" in str(e) \
                else f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]})"
        if key not in split_of:  # (S1) its partner is off the lists, or its json cannot say
            count(left_out, "whose Sentinel-2 partner is not on the official lists, or not named")
        elif not target.any() and name not in unusable:
            count(left_out, f"with no label among the {n_classes} classes")
        else:
            files.append(name)
            splits.append(split_of[key])
            targets.append(target)
    if not files:
        what = "BigEarthNet-S1" if s1 else "BigEarthNet-S2"
        found = ", ".join(f"{n} {r}" for r, n in left_out.items()) or "no sub-folders"
        raise UserError(f"{folder} holds no {what} v1.0 patch folders of the official splits "
                        f"({found}); pass --root DIR holding {archive}/<patch>/<patch>_<band>.tif")
    return dict(root=folder, classes=classes, classnames=[c.lower() for c in classes],
                files=files, labels=np.stack(targets), official_split=splits, left_out=left_out,
                unusable=unusable)


def read_bigearthnet_s1(folder):
    """A BigEarthNet-S1 v1.0 patch with its S2 partner (BigEarthNet-v1.0/<partner>/ beside): the
    partner's three arrays and the S1 patch's (120, 120, 2) float32 VV, VH in dB."""
    name = os.path.basename(folder.rstrip(os.sep))
    with open(os.path.join(folder, f"{name}_labels_metadata.json")) as f:
        partner = json.load(f)["corresponding_s2_patch"]
    s2 = os.path.join(os.path.dirname(os.path.dirname(folder.rstrip(os.sep))), "BigEarthNet-v1.0",
                      partner)
    if not os.path.isdir(s2):
        raise ValueError(f"has no Sentinel-2 partner: {partner} ({s2}) does not exist")
    return (*read_bigearthnet(s2), read_sar(folder))


def read_sar(folder):
    """A BigEarthNet-S1 patch folder (v1.0 or v2.0) as (120, 120, 2) float32 VV, VH in dB."""
    name, sar = os.path.basename(folder.rstrip(os.sep)), []
    for band in BIGEARTHNET_S1:
        path = os.path.join(folder, f"{name}_{band}.tif")
        image = read_tif(path) if os.path.isfile(path) else None
        if image is None or image.shape != (120, 120) or image.dtype != np.float32:
            found = "missing" if image is None else f"{image.dtype} {image.shape}"
            raise ValueError(f"band {path} is {found}, expected float32 (120, 120) dB")
        sar.append(image)
    return np.stack(sar, axis=-1)


def list_bigearthnet_v2(dataset, root, download=False, n_classes=19, s1=False):
    """BigEarthNet v2.0 (reBEN): the patches root/metadata.parquet lists, in
    root/BigEarthNet-S2/<tile>/<patch>/; with `s1`, '<S2 folder>#<S1 partner>' (docs/data.md)."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"--data {dataset} reads metadata.parquet with pyarrow; pip install "
                        "pyarrow")
    path = os.path.join(root, "metadata.parquet")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; pass --root DIR holding BigEarthNet v2.0's "
                        f"metadata.parquet and BigEarthNet-S2/ (v1.0: --data bigearthnet19)")
    meta = pq.read_table(path, columns=["patch_id", "labels", "split", "s1_name", "s2v1_name"])
    labels, nomenclature = pc.list_flatten(meta["labels"]), bigearthnet_nomenclature()
    index = pc.index_in(labels, value_set=pa.array(nomenclature["labels19"]))
    if index.null_count:
        raise UserError(f"{path} has label {pc.filter(labels, pc.is_null(index))[0]}, not a "
                        f"BigEarthNet-19 name; pass the release's metadata.parquet")
    level1 = {v: nomenclature["map43to5"][k] for k, v in nomenclature["map43to19"].items()}
    to_class = np.array([j if n_classes == 19 else level1[j] for j in range(19)])
    targets = np.zeros((len(meta), n_classes), np.uint8)
    targets[pc.list_parent_indices(meta["labels"]).to_numpy(), to_class[index.to_numpy()]] = 1
    files = [f"BigEarthNet-S2/{p.rsplit('_', 2)[0]}/{p}" for p in meta["patch_id"].to_pylist()]
    if s1:
        files = [f"{f}#{name}" for f, name in zip(files, meta["s1_name"].to_pylist())]
    classes = nomenclature[f"labels{n_classes}"]
    return dict(root=root, classes=classes, classnames=[c.lower() for c in classes], files=files,
                labels=targets, official_split=["val" if s == "validation" else s
                                                for s in meta["split"].to_pylist()],
                aliases=meta["s2v1_name"].to_pylist())


def read_bigearthnet_v2_s1(path):
    """A BigEarthNet v2.0 pair '<root>/BigEarthNet-S2/<tile>/<patch>#<S1 name>': the S2 patch's
    arrays and its S1 partner's VV, VH (in root/BigEarthNet-S1/<S1 folder>/<S1 name>/)."""
    s2, name = path.rsplit("#", 1)
    root = os.path.dirname(os.path.dirname(os.path.dirname(s2)))
    folder = os.path.join(root, "BigEarthNet-S1", name.rsplit("_", 3)[0], name)
    if not os.path.isdir(folder):
        raise ValueError(f"has no Sentinel-1 partner: {name} ({folder}) does not exist")
    return (*read_bigearthnet(s2), read_sar(folder))


def sen12ms_targets(shares, threshold=0.1):
    """The SEN12MS toolbox's 10 simplified IGBP classes of a patch's 17 IGBP shares, present at >=
    threshold."""
    p = np.asarray(shares, np.float64)
    simplified = [p[0:5].sum(), p[5:7].sum(), p[7:9].sum(), p[9], p[10], p[11] + p[13], p[12],
                  p[14], p[15], p[16]]
    return (np.array(simplified) >= threshold).astype(np.uint8)


def list_sen12ms(dataset, root, download=False, threshold=0.1, val_fraction=0.1):
    """SEN12MS: root/ROIs<id>_<season>/s2_<scene>/<...>_p<patch>.tif with the toolbox's label file
    and split lists beside them; val is a hashed tenth of the train scenes (docs/data.md)."""
    import pickle
    need = [os.path.join(root, f)
            for f in ("IGBP_probability_labels.pkl", "train_list.txt", "test_list.txt")]
    if not all(map(os.path.isfile, need)):
        raise UserError(f"{next(p for p in need if not os.path.isfile(p))} does not exist; --data "
                        f"{dataset} reads the ROIs*/s2_*/ folders and, beside them, the label file "
                        f"and split lists of the SEN12MS toolbox (github.com/schmitt-muc/SEN12MS)")
    with open(need[0], "rb") as f:
        shares = pickle.load(f)  # the toolbox's file: patch id -> 17 IGBP shares
    files, splits, targets, left_out = [], [], [], {}
    for split, path in zip(("train", "test"), need[1:]):
        with open(path) as f:
            for pid in sorted(line.strip() for line in f if line.strip()):
                season, rest = pid.split("_s2_")[:2]
                scene = "s2_" + rest.rsplit("_p", 1)[0]
                if not os.path.isfile(os.path.join(root, season, scene, pid)):
                    count(left_out, "listed but not on disk")
                    continue
                held = split == "train" and \
                    scene_hash(0, f"{season}/{scene}") / 2 ** 64 < val_fraction
                files.append(os.path.join(season, scene, pid))
                splits.append("val" if held else split)
                targets.append(sen12ms_targets(shares[pid], threshold))
    if not files:
        raise UserError(f"{root} holds none of the patches on its split lists; pass --root DIR "
                        f"holding ROIs*/s2_*/*.tif")
    return dict(root=root, classes=list(SEN12MS_CLASSES), classnames=list(SEN12MS_CLASSES),
                files=files, labels=np.stack(targets), official_split=splits, left_out=left_out)


def imagenet_prompts():
    """ImageNet's class names and the CLIP paper's 80 templates as open_clip ships them, keyed by
    the synset ids in their sorted order as timm ships them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo
    synsets = ImageNetInfo().label_names()
    assert len(synsets) == len(IMAGENET_CLASSNAMES) == 1000 and synsets == sorted(synsets)
    return (dict(zip(synsets, IMAGENET_CLASSNAMES)),
            tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES))


def list_imagenet(dataset, root, download=False):
    """The ILSVRC-2012 validation set, one folder per synset (any subset): the test split."""
    names, _ = imagenet_prompts()
    folder = next((p for p in (os.path.join(root, "val"), root) if os.path.isdir(p)), root)
    unknown = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
                     and d not in names) if os.path.isdir(folder) else []
    if unknown:
        more = f" (nor {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(f"{os.path.join(folder, unknown[0])} is not an ILSVRC-2012 synset "
                        f"folder{more}; --data imagenet reads <root>/<synset id, e.g. "
                        f"n01440764>/<images> (--data folder reads others)")
    listed = list_class_folders(dataset, folder, classnames=names)
    return {**listed, "official_split": ["test"] * len(listed["files"])}


def read_rgb(path):
    """An 8-bit image as uint8 (H, W, 3), read with PIL."""
    from PIL import Image
    try:
        with quietly(Image.open, path, logger="PIL") as image:  # PIL logs the reason said below
            return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants
    except Exception as e:
        tif = path.lower().endswith(TIF_SUFFIXES)
        raise ValueError(f"cannot decode image ({type(e).__name__}: {str(e)[:160]})" + (
            "; a Sentinel-2 GeoTIFF? pass --data eurosat_ms (or another Sentinel-2 data set)"
            if tif else ""))


def read_tif(path):
    """A GeoTIFF as a numpy array (tifffile); ValueError with the reason when it cannot be read."""
    try:
        return quietly(tifffile.imread, path, logger="tifffile")  # its log repeats the reason
    except Exception as e:
        raise ValueError(f"cannot read GeoTIFF ({type(e).__name__}: {e})")


def read_s2_tif(path):
    """A 13-band Sentinel-2 tif as uint16 (H, W, 13) as stored (EuroSAT MS: S2_BANDS order;
    SEN12MS's bands-first tifs: SEN12MS_BANDS order)."""
    image = read_tif(path)
    if image.ndim == 3 and image.shape[0] == len(S2_BANDS) and image.shape[-1] != len(S2_BANDS):
        image = image.transpose(1, 2, 0)  # bands-first tif
    if image.ndim != 3 or image.shape[-1] != len(S2_BANDS):
        raise ValueError(f"has shape {image.shape}, expected (H, W, {len(S2_BANDS)}) Sentinel-2 "
                         f"bands")
    if image.dtype != np.uint16:
        raise ValueError(f"has dtype {image.dtype}, expected uint16 L1C digital numbers")
    return image


def read_bigearthnet(folder):
    """A BigEarthNet-S2 v1.0 patch folder as three uint16 arrays in BIGEARTHNET_BANDS order:
    (120, 120, 4), (60, 60, 6), (20, 20, 2)."""
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
                raise ValueError(f"band {path} is {image.dtype} {image.shape}, expected uint16 "
                                 f"({size}, {size})")
            group.append(image)
        groups.append(np.stack(group, axis=-1))
    return tuple(groups)


@dataclass(frozen=True)
class DataSet:
    """One entry of DATA: what the stages know about a data set."""
    modality: str  # 'rgb': 8-bit images; 'ms': Sentinel-2 bands (CLIP sees their composite)
    root: str  # default --root (None: --root is required)
    lister: object  # (name, root, download) -> Scenes fields: root, files, labels, classes, ...
    reader: object  # path -> uint8 (H, W, 3), or a tuple of (h, w, bands) arrays (pixels.bands)
    templates: tuple
    pixels: Pixels = None  # 'ms' only: the stored bands and the RGB composite's constant
    official_splits: bool = False  # False: hashed_split of the scene ids
    multilabel: bool = False  # (N, C) 0/1 targets: binary cross-entropy and mAP
    scenes: str = None  # the scenes its files show, shared by entries that are one set of
    #                     scenes in other bands or classes (EuroSAT); None: its own folder
    renames: str = None  # the scene set it re-releases, which its Scenes.aliases name


def _folders(**kw):
    return lambda name, root, download: list_class_folders(name, root, download, **kw)


def _bigearthnet(n_classes, s1=False, v2=False):
    def lister(name, root, download):
        lists = list_bigearthnet_v2 if v2 else list_bigearthnet
        return lists(name, root, download, n_classes, s1)
    reader = (read_bigearthnet_v2_s1 if v2 else read_bigearthnet_s1) if s1 else read_bigearthnet
    pixels = Pixels((*BIGEARTHNET_BANDS, tuple(BIGEARTHNET_S1)), L2A_RGB_MAX, BIGEARTHNET_S1) \
        if s1 else Pixels(BIGEARTHNET_BANDS, L2A_RGB_MAX)
    root = "data/BigEarthNet-v2.0" if v2 else "data" if s1 else "data/BigEarthNet-v1.0"
    return DataSet("ms", root, lister, reader, GENERIC_TEMPLATES, pixels, official_splits=True,
                   multilabel=True, scenes="bigearthnet_v2" if v2 else "bigearthnet",
                   renames="bigearthnet" if v2 else None)


DATA = {
    "eurosat": DataSet("rgb", "data/eurosat", _folders(
        classnames=EUROSAT_CLASSNAMES, fetch=download_eurosat,
        subfolders=(os.path.join("eurosat", "2750"), "2750")),
        read_rgb, EUROSAT_TEMPLATES, scenes="eurosat"),
    "eurosat_ms": DataSet("ms", "data/EuroSAT_MS", _folders(
        classnames=EUROSAT_CLASSNAMES, suffixes=TIF_SUFFIXES, subfolders=(EUROSAT_MS_FOLDER,),
        fetch=lambda root: download_eurosat(root, ms=True), sample="data/eurosat_ms_sample"),
        read_s2_tif, EUROSAT_TEMPLATES, Pixels((S2_BANDS,), L1C_RGB_MAX), scenes="eurosat"),
    "resisc45": DataSet("rgb", "data/NWPU-RESISC45", _folders(
        classnames=lambda c: c.replace("_", " ")), read_rgb, RESISC45_TEMPLATES),
    "folder": DataSet("rgb", None, _folders(), read_rgb, GENERIC_TEMPLATES),
    "imagenet": DataSet("rgb", None, list_imagenet, read_rgb, None,  # templates: open_clip's
                        official_splits=True),
    "bigearthnet19": _bigearthnet(19),
    "bigearthnet43": _bigearthnet(43),
    "bigearthnet5": _bigearthnet(5),
    "bigearthnet19_s1": _bigearthnet(19, s1=True),
    "bigearthnet19_v2": _bigearthnet(19, v2=True),  # BigEarthNet v2.0 (reBEN): docs/data.md
    "bigearthnet5_v2": _bigearthnet(5, v2=True),  # level 1 of the 19, not of the 43 (v1.0's)
    "bigearthnet19_v2_s1": _bigearthnet(19, s1=True, v2=True),
    "sen12ms": DataSet("ms", "data/SEN12MS", list_sen12ms, read_s2_tif, GENERIC_TEMPLATES,
                       Pixels((SEN12MS_BANDS,), L1C_RGB_MAX), official_splits=True,
                       multilabel=True),
}
MS_DATASETS = tuple(name for name, entry in DATA.items() if entry.modality == "ms")


def list_scenes(dataset, root=None, download=False):
    """All labelled scenes of a data set, with the official split of each where it has one."""
    if dataset not in DATA:
        raise UserError(f"unknown --data '{dataset}'; choose one of {', '.join(DATA)}")
    entry = DATA[dataset]
    root = root or entry.root
    if root is None:
        raise UserError(f"--data {dataset} needs its folder: --root DIR (or --data "
                        f"{dataset}=DIR), a folder with one sub-folder of images per class")
    listed = entry.lister(dataset, root, download)
    templates = entry.templates if entry.templates is not None else imagenet_prompts()[1]
    return Scenes(dataset, modality=entry.modality, templates=templates, **listed)


def scene_set(dataset, root):
    """Which scenes a data set shows: 'eurosat' (jpgs and tifs), 'bigearthnet', else the folder's
    real path."""
    return DATA[dataset].scenes or os.path.realpath(root)


def scene_id(file):
    """A scene's id: its path below the data root without extension (a jpg and a tif of one scene
    share it)."""
    return os.path.splitext(file)[0].replace(os.sep, "/")


def train_ids(scenes):
    """A training record's scenes: their ids and, for a re-release, '<first scene set>:<id>'."""
    return sorted(map(scene_id, scenes.files)) + sorted(
        f"{DATA[scenes.dataset].renames}:{i}" for i in scenes.aliases or ())


def scene_hash(seed, scene):
    """A scene's draw for a seed: the first 8 bytes of SHA-256("<seed>/<scene id>"), an integer."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{scene}".encode()).digest()[:8], "big")


def hashed_split(ids, seed):
    """Each scene's split from its id and the seed alone: u = scene_hash / 2^64, train if u < 0.7,
    val if u < 0.8, else test. Adding or removing files never moves another scene."""
    cuts = np.cumsum(list(SPLIT_FRACTIONS.values()))
    u = np.array([scene_hash(seed, i) / 2 ** 64 for i in ids])
    return [list(SPLIT_FRACTIONS)[k] for k in np.searchsorted(cuts, u, side="right")]


def split_indices(scenes, seed):
    """{'train', 'val', 'test'} -> sorted indices of the scenes: official splits, else hashed."""
    names = np.array(scenes.official_split or
                     hashed_split([scene_id(f) for f in scenes.files], seed))
    return {split: np.flatnonzero(names == split) for split in SPLIT_FRACTIONS}


def take_split(scenes, split, seed):
    """One split ('train', 'val', 'test', or 'all' of them) of listed scenes."""
    if split == "all":
        return replace(scenes, seed=seed)
    return replace(scenes.subset(split_indices(scenes, seed)[split], split), seed=seed)


def load_split(dataset, root, split, seed, download=False):
    """The scenes of one split ('train', 'val', 'test', or 'all') of a data set."""
    return take_split(list_scenes(dataset, root, download), split, seed)


def left_out_note(scenes):
    """'; left out 57 scenes with no label among the 19 classes, ...' or ''."""
    notes = ", ".join(f"{n} scenes {reason}" for reason, n in scenes.left_out.items())
    return f"; left out {notes}" if notes else ""


def read_scenes(path, sha256):
    """The scene ids of a stage-1 train_scenes.txt, checked against its recorded hash."""
    if not os.path.isfile(path) or sha256_of(path) != sha256:
        raise UserError(f"{path} is missing or differs from the training scenes its checkpoint "
                        f"recorded; restore it from the run folder, or re-run the stage")
    with open(path) as f:
        return set(f.read().split())


def check_held_out(scenes, trained, what):
    """Refuse to evaluate or validate on scenes that `what` was trained on (a set of ids)."""
    seen = [f for f in scenes.files if scene_id(f) in trained]
    if seen:
        raise UserError(f"{len(seen)} of the {len(scenes.files)} {scenes.split} scenes of "
                        f"{scenes.root} were training scenes of {what} (e.g. {seen[0]}): the data "
                        f"changed or another split was chosen; evaluate on the data and split seed "
                        f"it was trained with")


def with_prompts(scenes, path):
    """The scenes with the class names and/or templates of a --prompts file (docs/evaluation.md)."""
    if path is None:
        return scenes
    try:
        prompts = read_json(path)
        names, templates = prompts.get("classnames"), prompts.get("templates")
        assert set(prompts) <= {"classnames", "templates"} and prompts
    except OSError as e:
        raise UserError(f"--prompts {path} cannot be read ({e.strerror}); pass a JSON file")
    except (ValueError, AssertionError, AttributeError):
        raise UserError(f"--prompts {path} is not a JSON object with 'classnames' ({{folder: "
                        f"name}}) and/or 'templates' ([\"... {{}} ...\"]); fix the file")
    missing = [c for c in scenes.classes
               if not isinstance(names, dict) or not isinstance(names.get(c), str)]
    if names is not None and missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"--prompts {path} has no class name for {missing[0]!r}{more} of "
                        f"{scenes.dataset}; add it under 'classnames'")
    if templates is not None and not (isinstance(templates, list) and templates and all(
            isinstance(t, str) and t.count("{}") == 1 for t in templates)):
        raise UserError(f"--prompts {path}: 'templates' must be a list of strings with one '{{}}' "
                        f"each; fix the file")
    return replace(scenes, templates=scenes.templates if templates is None else tuple(templates),
                   classnames=scenes.classnames if names is None else
                   [names[c] for c in scenes.classes])


def trained_on(record, scenes):
    """Whether a record (patched.json, a student's) was trained on these scenes: the same scene set,
    or the same folder under another data-set name."""
    trained = record.get("scenes") or \
        scene_set(record["dataset"], record.get("root") or DATA[record["dataset"]].root or "")
    same_folder = bool(record.get("root")) and \
        os.path.realpath(record["root"]) == os.path.realpath(scenes.root)
    return trained == scene_set(scenes.dataset, scenes.root) or same_folder


def head_prompts(scenes, records=(), path=None):
    """The scenes with their zero-shot head's prompts: a --prompts file; else those of the first
    record trained on them with the same classes; else the data set's own."""
    if path:
        return with_prompts(scenes, path)
    for record in records:
        if list(record["classes"]) == list(scenes.classes) and "classnames" in record:
            return replace(scenes, classnames=list(record["classnames"]),
                           templates=tuple(record["templates"]))
    return scenes


# ---------------------------------------------------------------------------- reading batches


class ImageList(list):
    """A batch of 8-bit images of several sizes: a list of (H, W, 3) tensors (see clip_input)."""


def parts(image):
    """A stored image as a tuple of arrays (one per resolution; one array for most data sets)."""
    if isinstance(image, (tuple, list)) and not isinstance(image, ImageList):
        return tuple(image)
    return (image,)


def stack(images, shape, dtype):
    """Arrays of one kind as a batch: one tensor, or for images of several sizes an ImageList."""
    if not images:
        return torch.from_numpy(np.zeros((0, *shape), dtype))
    if all(image.shape == images[0].shape for image in images):
        return torch.from_numpy(np.stack(images))
    return ImageList(torch.from_numpy(np.array(image)) for image in images)


def as_batch(stacks, labels, indices, bad):
    return {"images": stacks[0] if len(stacks) == 1 else tuple(stacks),
            "labels": torch.from_numpy(labels), "index": torch.from_numpy(indices), "bad": bad}


class ImageFiles(Dataset):
    """`dataset[indices]`: a batch of raw images as stored, channels last (a tuple of stacks, one
    per resolution, for BigEarthNet), labels, indices and the `bad` (path, reason) files."""

    def __init__(self, scenes, skip_bad_files=False):
        self.scenes, self.skip_bad_files, self.skipped = scenes, skip_bad_files, {}
        self.read = DATA[scenes.dataset].reader
        if not scenes.files:
            why = f"none of its scenes are on the official {scenes.split} list" \
                if scenes.official_split is not None else \
                f"about {SPLIT_FRACTIONS.get(scenes.split, 1):.0%} of the scenes fall in it"
            raise UserError(f"the {scenes.split} split of {scenes.root} is empty ({why}); "
                            f"add images")
        reasons = []
        for name in scenes.files:  # the first readable file sets the size
            try:
                first = parts(self.read_one(name))
                break
            except ValueError as e:
                reasons.append(f"{os.path.join(scenes.root, name)} {e}")
        else:
            raise UserError(f"none of the {len(reasons)} {scenes.split} files can be read, e.g. "
                            f"{reasons[0]}")
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
                    raise ValueError(f"has shape {image[0].shape}, the others have "
                                     f"{self.shapes[0]}")
            except ValueError as e:
                bad.append((os.path.join(self.scenes.root, self.scenes.files[i]), str(e)))
                continue
            images.append(image)
            kept.append(i)
        kept = np.array(kept, np.int64)
        stacks = [stack([im[k] for im in images], shape, dtype)
                  for k, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes))]
        return as_batch(stacks, self.scenes.labels[kept], kept, bad)


class PackedImages(Dataset):
    """The batches of ImageFiles, sliced from a pack: per stored array, the images' bytes
    (images.bin, memory-mapped) and their shapes (shapes.npy)."""

    def __init__(self, folder, scenes):
        self.scenes, self.skipped, self.parts = scenes, {}, []  # a pack holds no bad files
        for k, dtype in enumerate(read_json(os.path.join(folder, "files.json"))["dtypes"]):
            shapes = np.load(os.path.join(folder, f"shapes{k or ''}.npy"))
            flat = np.memmap(os.path.join(folder, f"images{k or ''}.bin"), dtype, mode="r")
            ends = np.cumsum(np.prod(shapes, axis=1))
            if (shapes == shapes[0]).all():
                self.parts.append(flat.reshape(len(shapes), *shapes[0]))
            else:  # images of several sizes
                self.parts.append((flat, shapes, ends - np.prod(shapes, axis=1), ends))

    def __len__(self):
        return len(self.scenes.files)

    def __getitem__(self, indices):
        indices = np.asarray(indices, np.int64)
        stacks = []
        for part in self.parts:
            if isinstance(part, np.ndarray):  # one copy out of the page cache (np.take)
                stacks.append(torch.from_numpy(np.asarray(np.take(part, indices, axis=0))))
            else:
                flat, shapes, starts, ends = part
                stacks.append(stack([flat[starts[i]:ends[i]].reshape(shapes[i])
                                     for i in indices], None, None))
        return as_batch(stacks, self.scenes.labels[indices], indices, [])


def scenes_key(scenes):
    """What identifies a split's images: data root, split, seed, file list (and pack format)."""
    return {"root": os.path.abspath(scenes.root), "dataset": scenes.dataset,
            "split": scenes.split, "seed": scenes.seed, "files_sha256": sha256_of(scenes.files),
            "pack": 2}


def open_images(scenes, cache=None, workers=0, skip_bad_files=False):
    """The dataset of a split: ImageFiles, or with `cache` a PackedImages packed once into
    cache/packed-<hash of scenes_key>/, renamed into place whole (docs/runs.md)."""
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
            streams = [open(os.path.join(tmp, f"images{k or ''}.bin"), "wb")
                       for k in range(len(shapes))]
            files.skip_bad_files = False
            for batch in batch_loader(files, 512, workers=workers,
                                      hint="drop --cache to use --skip-bad-files"):
                for stream, shape, images in zip(streams, shapes, parts(batch["images"])):
                    for image in images:  # in the split's order (the loader keeps it)
                        stream.write(image.numpy().tobytes())
                        shape.append(image.shape)
            for k, stream in enumerate(streams):
                stream.close()
                np.save(os.path.join(tmp, f"shapes{k or ''}.npy"), np.array(shapes[k], np.int64))
            np.save(os.path.join(tmp, "labels.npy"), scenes.labels)
            write_json(os.path.join(tmp, "files.json"), {
                **scenes_key(scenes), "files": scenes.files,
                "dtypes": [str(d) for d in files.dtypes]})
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700
            os.rename(tmp, folder)  # fails when another run's pack got there first: use that one
        except OSError:
            if not os.path.isdir(folder):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return PackedImages(folder, scenes)


def training_batches(n, batch_size):
    """Training batches of n images: a last batch of one image is left out (BatchNorm needs two)."""
    return n // batch_size + (n % batch_size > 1)


def batch_loader(dataset, batch_size, train=False, shuffle=True, seed=0, epoch=0, workers=0,
                 desc=None, hint=None):
    """The batches of a dataset (a progress bar `desc` on a terminal). In training:
    training_batches() batches, shuffled in an order drawn from (seed, epoch) alone, so a resumed
    run sees the same batches. An unreadable file stops the run in one line naming it, or with
    skip_bad_files is left out and listed in dataset.skipped."""
    from tqdm import tqdm
    n = len(dataset)
    order = list(range(n))
    if train and shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        order = order.tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if train:
        batches = batches[:training_batches(n, batch_size)]
    if isinstance(dataset, PackedImages):  # a batch from a memory map is one copy: workers
        workers = 0                          # would only add another
    loader = DataLoader(dataset, batch_size=None, sampler=batches, num_workers=workers,
                        pin_memory=torch.cuda.is_available(),
                        prefetch_factor=4 if workers > 0 else None)
    quiet = desc is None or not sys.stderr.isatty()
    for batch in tqdm(loader, desc=desc, leave=False, disable=quiet):
        for path, reason in batch.pop("bad"):
            if not getattr(dataset, "skip_bad_files", False):
                raise UserError(f"{path} {reason}; replace or delete the file, or "
                                f"{hint or 'pass --skip-bad-files'}")
            dataset.skipped[path] = reason
        if len(batch["index"]):
            yield batch


# ============================================================================ runs (plumbing)
#
# Nothing of the method below this line. A run writes into OUT.partial/ and, once finished,
# renames it to OUT (replacing an earlier run there only then): OUT only ever holds a finished
# run. After an error or a stop, OUT.partial/ stays if it holds an end-of-epoch checkpoint
# (last.pt) for --resume, and is removed otherwise (docs/runs.md).


class Flags(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: argument --epochs: ...`, exit 2."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def number(kind, low, high=None, above=False):
    """An argparse type: a `kind` (int or float) >= low (> low with `above`) and <= high."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if value < low or (above and value == low) or (high is not None and value > high):
            bound = f"> {low}" if above else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: pass a value {bound}"
                                             + (f" and <= {high}" if high is not None else ""))
        return value
    parse.range = (kind, low, high, above)  # for the tests
    return parse


def add_run_flags(p, out, out_help=None, training=True):
    """The flags of how and where a stage runs, the same in every stage that takes them
    (--seed and --resume: the training stages)."""
    add = p.add_argument
    if training:
        add("--seed", type=number(int, 0), default=0, help="seed of the model's init, the data "
            "order and augmentation (default: 0)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--workers", type=number(int, 0), default=min(8, os.cpu_count() or 1),
        help="loader processes (default: cores, up to 8)")
    add("--cache", help="folder for packed, memory-mapped splits and stage 2's teacher "
        "embeddings (default: none)")
    add("--out", default=out, help=out_help or f"run folder (default: {out})")
    if training:
        add("--resume", action="store_true",
            help="continue the unfinished run of --out from its last epoch")
    add("--overwrite", action="store_true",
        help="replace the run in --out once this one has finished")
    add("--skip-bad-files", action="store_true", help="skip unreadable images, count them")
    add("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add("--no-plots", action="store_true", help="draw no pictures (default: draw them)")
    add("--redraw", metavar="OUT", help="only draw the pictures of a finished run folder again")


def run_stage(run, args):
    """How every stage's main() ends: bad input, one line `error: ...` and exit code 2 (a traceback
    with --debug); Ctrl-C or SIGTERM, one line saying what was kept and exit code 130."""
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


FINISHED = {"01_patch_clip.py": "patched.json", "02_align_s2.py": "student.pt",
            "03_eval.py": "metrics.json"}


def finished_by(folder):
    """The stage whose finished run a folder holds (by its marker file), or None."""
    return next((stage for stage, marker in FINISHED.items()
                 if os.path.exists(os.path.join(folder, marker))), None)


def check_run(out, stage, resume=False, overwrite=False):
    """Before any work, writing nothing: OUT may hold only a finished run of this stage, OUT.partial
    an unfinished one whose process has ended (its pid file)."""
    out, go_on = os.path.abspath(out), "--resume to continue it, " if stage != "03_eval.py" else ""
    check_writable(out, "--out", "DIR")
    if os.path.exists(f"{out}.replaced"):
        raise UserError(f"{out}.replaced exists (a run stopped while it replaced {out}): move it "
                        f"back to {out} or delete it")
    if os.path.isdir(out) and os.listdir(out):
        if finished_by(out) != stage:
            held = f"a run of {finished_by(out)}" if finished_by(out) else "no finished run"
            raise UserError(f"{out} holds {held}; pass another --out (a run folder holds one "
                            f"stage's run)")
        if not (overwrite or resume):  # a resumed run was started with --overwrite
            raise UserError(f"{out} already holds a finished run; pass --overwrite or another "
                            f"--out")
    try:
        with open(f"{out}.partial/pid") as f:
            pid = int(f.read())
        os.kill(pid, 0)  # raises when no such process runs
        running = pid != os.getpid()
    except (OSError, ValueError):
        running = False
    if running:
        raise UserError(f"{out}.partial is in use by a running process (pid {pid}); wait for it, "
                        f"or pass another --out")
    if resume and not os.path.isfile(f"{out}.partial/last.pt"):
        raise UserError(f"nothing to resume: {out}.partial/last.pt does not exist; drop --resume "
                        f"to start afresh")
    if os.path.exists(f"{out}.partial") and not (resume or overwrite):
        raise UserError(f"{out}.partial holds an unfinished run (its process has ended); pass "
                        f"{go_on}--overwrite to start afresh, or another --out")


@contextlib.contextmanager
def run_folder(out, stage, resume=False, overwrite=False):
    """OUT.partial/, made by this run (or the one --resume continues), renamed to OUT when the block
    ends; after an error or a stop removed, unless it holds a checkpoint to resume from."""
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
    with open(os.path.join(work, "pid"), "w") as f:  # later runs leave the folder alone meanwhile
        f.write(str(os.getpid()))
    try:
        yield work
    except BaseException as e:
        if not os.path.isfile(os.path.join(work, "last.pt")):
            shutil.rmtree(work, ignore_errors=True)
            raise
        if not isinstance(e, (UserError, KeyboardInterrupt)):
            raise
        kept = f"the last finished epoch is kept in {work}/last.pt: --resume with the same " \
               f"flags continues it"
        raise type(e)(f"{e}; {kept}" if str(e) else kept) from None
    for scratch in ("last.pt", "pid"):  # finished: nothing left to resume
        if os.path.exists(os.path.join(work, scratch)):
            os.remove(os.path.join(work, scratch))
    if os.path.exists(out):
        os.rename(out, f"{out}.replaced")
    os.rename(work, out)
    shutil.rmtree(f"{out}.replaced", ignore_errors=True)


def check_writable(path, flag, kind="FILE"):
    """That a FILE (or a DIR to make) can be written at `path`, writing nothing."""
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    wrong = os.path.exists(path) and os.path.isdir(path) != (kind == "DIR")
    if wrong or not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = f"a {'file' if kind == 'DIR' else 'folder'} is there" if wrong else \
            f"{existing} is not a writable folder"
        raise UserError(f"cannot write {path} ({why}); pass another {flag} {kind}")


def write_atomic(path, write):
    """Write a file whole or not at all: `write(tmp_path)`, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix="." + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tidy(obj):
    """For JSON: floats holding float32 values with the shortest digits that give them back."""
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
        if "Weights only load failed" in str(e):
            raise UserError(f"{what} {path} holds code: refused unread; {fix}")
        raise UserError(f"{what} {path} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); it may be truncated; {fix}")


def describe_run(args, device, stage):
    """args.json (DINO-style): sorted arguments, stage, versions, device, git revision; one line."""
    import open_clip
    import timm
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                             timeout=5).stdout.strip()
    except Exception:
        git = ""
    versions = {m.__name__: m.__version__ for m in (torch, torchvision, open_clip, timm, np)}
    info = {"args": dict(sorted(vars(args).items())), "stage": stage, "device": str(device),
            "git": git or "unknown", "versions": {"python": platform.python_version(), **versions},
            **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})}
    print(f"device {info.get('gpu', device)} | torch {torch.__version__} open_clip "
          f"{open_clip.__version__} timm {timm.__version__} | git {info['git']} | run folder "
          f"{args.out} (flags in args.json)")
    return info


# Not what a resume must keep: how and where it runs; paths (data and teacher: by their hash).
NOT_SETTINGS = {"resume", "overwrite", "debug", "workers", "device", "cache", "no_plots",
                "redraw", "out", "root", "teacher", "control_root"}


def run_identity(args, **data):
    """What a --resume must share with the run it continues: the flags that shape the results and
    `data` (hashes of the training list and the teacher's weights)."""
    flags = json.loads(json.dumps(vars(args), default=str))
    return {**{k: v for k, v in sorted(flags.items()) if k not in NOT_SETTINGS}, **data}


def save_checkpoint(work, identity, epoch, step, history, **states):
    """The end of an epoch: work/last.pt (the run's identity, epoch, step, epoch log, RNG, and the
    states' state dicts) and work/log.jsonl, one JSON line per epoch."""
    save_torch(os.path.join(work, "last.pt"), {
        "identity": identity, "epoch": epoch, "step": step, "history": history,
        "torch_rng": torch.get_rng_state(), **{k: v.state_dict() for k, v in states.items()}})
    with open(os.path.join(work, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(tidy(row), sort_keys=True) + "\n" for row in history)


def restart_from_checkpoint(work, identity, resume, **states):
    """(the first epoch, step, epoch log) of a run: (0, 0, []), or with --resume work/last.pt
    restored into `states`, once shown to be this run's (same flags, training list, teacher)."""
    if not resume:
        return 0, 0, []
    ckpt = load_torch(os.path.join(work, "last.pt"), "resume checkpoint",
                      "drop --resume to start afresh")
    saved = ckpt.get("identity", {})
    changed = sorted(k for k in saved.keys() | identity.keys() if saved.get(k) != identity.get(k))
    words = {"train_files_sha256": "the training list changed",
             "teacher_sha256": "the teacher's weights changed"}
    if changed:
        raise UserError(f"--resume of another run than {work}/last.pt was saved by: " + ", ".join(
            words.get(k, f"--{k.replace('_', '-')} was {saved.get(k)}") for k in changed)
            + "; resume with the flags, data and teacher it was started with, or pass "
            "--overwrite to start afresh")
    for k, v in states.items():
        v.load_state_dict(ckpt[k])
    torch.set_rng_state(ckpt["torch_rng"])
    print(f"resumed {work}/last.pt after epoch {ckpt['epoch']} (step {ckpt['step']})")
    return ckpt["epoch"] + 1, ckpt["step"], ckpt["history"]


def new_figure(width, height, ncols=1, **subplots):
    """An empty matplotlib Figure (inches at 100 dpi; no pyplot, no global state), ncols axes."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False, **subplots)[0]


def epoch_axis(ax, epochs, *series):
    """An axis of per-epoch values that reads at one epoch too: whole epochs, y from 0 then."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:
        top = max(max(values) for values in series)
        ax.set(xlim=(epochs[0] - 1, epochs[0] + 1), ylim=(0, 1.2 * top if top > 0 else 1))


def redraw(folder, stage, pictures, debug=False):
    """--redraw OUT: draw the pictures of a finished run of this stage again, from its JSON."""
    args = os.path.join(folder, "args.json")
    if not (os.path.isfile(os.path.join(folder, "metrics.json")) and os.path.isfile(args)
            and read_json(args).get("stage") == stage):
        raise UserError(f"{folder} holds no finished run of {stage}; pass --redraw OUT of one")
    draw_pictures(folder, pictures(folder) if callable(pictures) else pictures, debug)


def draw_pictures(folder, pictures, debug=False):
    """A run's pictures {file name: function(folder) -> Figure}, drawn from its JSON; a failed
    picture is one line and never costs the run."""
    if importlib.util.find_spec("matplotlib") is None:
        return print(f"plots: matplotlib is not installed; pip install matplotlib to get "
                     f"{', '.join(pictures)} (or pass --no-plots)")
    for name, plot in pictures.items():
        try:
            figure = plot(folder)
            write_atomic(os.path.join(folder, name), lambda tmp: figure.savefig(tmp, format="png"))
            print(f"plots: wrote {os.path.join(folder, name)}")
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{folder} is saved, its pictures are not; draw them with "
                                    f"--redraw {folder}")
        except Exception as e:
            if debug:
                raise
            print(f"plots: could not draw {name} ({type(e).__name__}: {str(e)[:160]}); the run "
                  f"is saved")
