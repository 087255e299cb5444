"""Throughput of the data path and the training steps of stages 1 and 2 (a script; pytest does not collect it).

    python tests/benchmark.py --loader-only                     # (a) only: the loader figures in the README
    python tests/benchmark.py --batch-size 64                   # the CPU step figures in the README
    python tests/benchmark.py --root data/EuroSAT_MS --model ViT-B-32 --batch-size 256   # on a GPU
    python tests/benchmark.py --bigearthnet 2000 --repeat 1 --loader-only   # BigEarthNet-layout patches

Prints, for each stage on the device it finds:
  (a) the loader alone, images/s, from the tifs and from the packed cache (--cache);
  (b) the model step alone (device-side preprocessing, forward, loss, backward, AdamW) on a raw
      batch already on the device, images/s;
  (c) the real training step fed by the loader, images/s, and the ratio c/b (1.0: the loader
      never makes the device wait);
and the teacher's forward pass alone, which stage 2's teacher cache takes out of every step.
With --bigearthnet N, N patches in the BigEarthNet-S2 v1.0 layout (12 band tifs at their own sizes
and a labels json each, random values) are written to a temporary folder and read as
--data bigearthnet19 (batches of three per-resolution arrays; the cache stores each at its own
size); the listing rate (labels json read per patch) is printed too.
The files are listed --repeat times so a small sample gives long epochs; after the first pass
they come from the OS page cache, as in the later epochs of a real run.
"""
import argparse
import atexit
import importlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

patch = importlib.import_module("01_patch_clip")  # its augmentation


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "data", "eurosat_ms_sample"),
                   help="EuroSAT MS folder (default: the shipped data/eurosat_ms_sample)")
    p.add_argument("--repeat", type=int, default=40, help="list the files this many times (default: 40)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model of stage 1 (random weights) (default: ViT-B-32)")
    p.add_argument("--student", default="vit_small_patch16_224", help="timm student (default: vit_small_patch16_224)")
    p.add_argument("--input-size", type=int, default=None, help="student input side (default: the model's, 224)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--steps", type=int, default=None, help="timed model steps (default: 20 on GPU, 2 on CPU)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader processes (default: one per core, up to 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--bigearthnet", type=int, default=0, metavar="N",
                   help="benchmark N generated BigEarthNet-layout patches instead of --root (default: 0, off)")
    p.add_argument("--loader-only", action="store_true", help="print (a) only: no models are built")
    return p.parse_args()


def make_bigearthnet(root, n):
    """n patches in the BigEarthNet-S2 v1.0 layout, named from the official train list."""
    import json
    import tifffile
    names = [name for name, split in C.official_splits().items() if split == "train"][:n]
    rng = np.random.default_rng(0)
    for name in names:
        os.makedirs(os.path.join(root, name))
        for bands, size in zip(C.BIGEARTHNET_BANDS, C.BIGEARTHNET_SIZES):
            for band in bands:
                tifffile.imwrite(os.path.join(root, name, f"{name}_{band}.tif"),
                                 rng.integers(0, 4000, (size, size), dtype=np.uint16))
        with open(os.path.join(root, name, f"{name}_labels_metadata.json"), "w") as f:
            json.dump({"labels": ["Pastures", "Coniferous forest"]}, f)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_rate(dataset, args, device, max_images=None):
    """Images/s of the loader alone (the first batch, which starts the workers, is not timed)."""
    loader = C.batch_loader(dataset, args.batch_size, train=True, workers=args.workers)  # pins memory on CUDA
    next(loader)
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += len(batch["index"])
        if max_images and n >= max_images:
            break
    return n / (time.perf_counter() - start)


def step_rates(step, dataset, args, device):
    """(b) the step on one raw batch already on the device, (c) the step fed by the loader."""
    raw = dataset[list(range(args.batch_size))]
    images = [p.to(device) for p in C.parts(raw["images"])]
    on_device = {"images": images[0] if len(images) == 1 else tuple(images), "labels": raw["labels"].to(device), "index": raw["index"]}
    step(on_device)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(on_device)
    sync(device)
    b = args.steps * args.batch_size / (time.perf_counter() - start)
    # main() lists at least (steps + 2) batches of images: the steps + 1 batches taken here are all whole
    loader = C.batch_loader(dataset, args.batch_size, train=True, workers=args.workers)
    step(next(loader))
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(next(loader))
    sync(device)
    c = args.steps * args.batch_size / (time.perf_counter() - start)
    return b, c


def main():
    args = parse_args()
    device = C.pick_device(args.device)
    args.steps = args.steps or (20 if device.type == "cuda" else 2)
    import open_clip
    import timm
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device} | torch "
          f"{torch.__version__} open_clip {open_clip.__version__} timm {timm.__version__}")
    if args.bigearthnet:
        args.root = tempfile.mkdtemp(prefix="bigearthnet-benchmark-")
        atexit.register(shutil.rmtree, args.root, True)
        make_bigearthnet(args.root, args.bigearthnet)
        start = time.perf_counter()
        C.official_splits()
        lists = time.perf_counter() - start
        start = time.perf_counter()
        scenes = C.list_scenes("bigearthnet19", args.root)
        print(f"listing: {len(scenes.files)} patches in {time.perf_counter() - start:.2f} s, of which reading the "
              f"official split lists takes about {lists:.2f} s (the rest: one labels json a patch)")
    else:
        scenes = C.list_scenes("eurosat_ms", args.root)
    scenes = replace(scenes, files=scenes.files * args.repeat, labels=np.tile(scenes.labels, args.repeat),
                     split="benchmark", seed=0)
    need = (args.steps + 2) * args.batch_size
    if len(scenes.files) < need:
        sys.exit(f"--repeat {args.repeat} lists {len(scenes.files)} files, fewer than the {need} needed; raise --repeat")
    with tempfile.TemporaryDirectory() as cache:
        tifs = C.open_images(scenes)
        packed = C.open_images(scenes, cache, args.workers)
        what = "patches" if args.bigearthnet else "tifs"
        print(f"\n{len(scenes.files)} {what} listed ({len(set(scenes.files))} distinct), batch {args.batch_size}, "
              f"{args.workers} workers, device {device}")
        print(f"(a) loader alone: {loader_rate(tifs, args, device):9.0f} images/s from tifs, "
              f"{loader_rate(packed, args, device):9.0f} images/s from the packed cache")
        if args.loader_only:
            return

        # The two training steps below do what the loops of 01_patch_clip.py and 02_align_s2.py do per
        # batch (device-side preprocessing, autocast forward, loss, backward, grad clip 1.0, AdamW,
        # scheduler), with a random head; keep them in step with the stages when those change.
        # stage 1: CLIP fine-tuning step (image tower, CE through the frozen zero-shot head)
        model, _, _ = C.load_clip(args.model, "none", device)
        preprocess_cfg = model.visual.preprocess_cfg
        head = F.normalize(torch.randn(model.visual.output_dim, len(scenes.classes), device=device), dim=0)
        opt1 = torch.optim.AdamW(model.visual.parameters(), lr=1e-5, weight_decay=0.1)
        sched1 = C.cosine_schedule(opt1, 1000, 100)

        def stage1_step(batch):
            images = C.clip_input(batch["images"], preprocess_cfg, device, scenes.pixels,
                                  patch.augmentation("flip", 0, 0))
            with C.autocast(device):
                loss = F.cross_entropy(C.zeroshot_logits(model.encode_image(images), head, model.logit_scale),
                                       batch["labels"].to(device))
            opt1.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.visual.parameters(), 1.0)
            opt1.step()
            sched1.step()

        # stage 2: student step against cached teacher embeddings (alignment_loss)
        align = importlib.import_module("02_align_s2")
        student = C.Student(args.student, model.visual.output_dim, args.input_size).to(device)
        targets = torch.randn(len(scenes.files), model.visual.output_dim)
        opt2 = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01)
        sched2 = C.cosine_schedule(opt2, 1000, 100)

        def stage2_step(batch):
            images = C.ms_input(batch["images"], student.input_size, device, pixels=scenes.pixels)
            with C.autocast(device):
                loss, _, _ = align.alignment_loss(student(images), targets[batch["index"]].to(device), head,
                                                  model.logit_scale.detach(), batch["labels"].to(device), 0.05)
            opt2.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt2.step()
            sched2.step()

        @torch.no_grad()
        def teacher_forward(batch):  # what stage 2 would run every step without its teacher cache
            with C.autocast(device):
                model.encode_image(C.clip_input(batch["images"], preprocess_cfg, device, pixels=scenes.pixels))

        teacher, _ = step_rates(teacher_forward, packed, args, device)
        student_b, _ = step_rates(stage2_step, packed, args, device)
        print(f"stage-2 teacher forward alone: {teacher:8.1f} images/s; the teacher cache saves "
              f"{1 / teacher / (1 / teacher + 1 / student_b):.0%} of each uncached step after the first epoch")
        for name, step in ((f"stage 1 ({args.model})", stage1_step), (f"stage 2 ({args.student}, "
                           f"{student.input_size}px)", stage2_step)):
            for source, dataset in (("tifs", tifs), ("cache", packed)):
                b, c = step_rates(step, dataset, args, device)
                print(f"{name:42s} from {source:5s}: (b) step alone {b:8.1f} images/s  "
                      f"(c) fed by the loader {c:8.1f} images/s  c/b {c / b:.2f}")


if __name__ == "__main__":
    main()
