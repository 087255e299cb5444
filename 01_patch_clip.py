"""Stage 1: patch an open_clip CLIP on remote-sensing RGB images (PAINT, Ilharco et al. 2022).

    python 01_patch_clip.py --data eurosat --control resisc45       # PAINT's recipe on EuroSAT
    python 01_patch_clip.py --data bigearthnet19 --control imagenet \\
        --control-root data/imagenet/val --control-per-class 10     # PAINT's supported task
    python 01_patch_clip.py --model ViT-S-32 --pretrained none --data eurosat_ms \\
        --root ../shared/data/eurosat_ms_sample --epochs 1 --out runs/smoke/patch  # CPU smoke run

1. Zero-shot head W from class names x prompt templates with the text tower (frozen).
2. Fine-tune the image tower with cross-entropy through W (BCE for multi-label data).
3. Interpolate the image tower, theta(a) = (1 - a) theta_zs + a theta_ft, for each a in --alphas;
   evaluate each on the task's validation split and, with --control, zero-shot on a control data
   set; keep the a with the best mean of the two (PAINT's rule).
Writes OUT/: args.json, log.jsonl, metrics.json, finetuned.pt (the fine-tuned tower),
train_scenes.txt, the patched CLIP in open_clip's folder format ("local-dir:OUT"), patched.json
and alpha.png.
"""
import argparse
import copy
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import common as C

STAGE = "01_patch_clip.py"


def parse_args(argv=None):
    p = C.Flags(__doc__)
    add = p.add_argument
    add("--data", default="eurosat", help="task data set, a name of the README's data table "
        "(default: eurosat)")
    add("--root", help="its folder (default: data/<name>, see README)")
    add("--download", action="store_true", help="download EuroSAT (RGB or MS) first")
    add("--control", help="control data set, zero-shot, to pick alpha: resisc45, imagenet, ... "
        "(default: none; PAINT: imagenet)")
    add("--control-root", help="its folder (default: data/<name>)")
    add("--control-per-class", type=C.number(int, 1), metavar="N", help="evaluate the control "
        "on N images per class, fixed by --split-seed (default: all of its split)")
    add("--prompts", help="JSON file of class names and/or templates (default: the data set's "
        "own; docs/evaluation.md)")
    add("--model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32)")
    add("--pretrained", default="openai", help="open_clip tag, weights file, or 'none' "
        "(default: openai)")
    add("--epochs", type=C.number(int, 1), default=5, help="fine-tuning epochs (default: 5, "
        "PAINT; the official BigEarthNet config: 1)")
    add("--max-steps", type=C.number(int, 1), help="stop after this many steps (default: none)")
    add("--batch-size", type=C.number(int, 1), default=128, help="images per step (default: 128)")
    add("--lr", type=C.number(float, 0, above=True), default=1e-5,
        help="peak AdamW learning rate (default: 1e-5)")
    add("--wd", type=C.number(float, 0), default=0.1, help="AdamW weight decay (default: 0.1, "
        "PAINT; the official config: 0.5)")
    add("--warmup", type=C.number(int, 0), help="linear warm-up steps (default: 200, at most a "
        "tenth of the run)")
    add("--label-smoothing", type=C.number(float, 0, 1), default=0.0, help="label smoothing of "
        "the loss (default: 0.0, as in effect in the official code, README)")
    add("--grad-clip", type=C.number(float, 0, above=True), default=1.0,
        help="max gradient L2 norm (default: 1.0)")
    add("--augment", default="flip", choices=("flip", "official", "none"), help="augmentation "
        "in fine-tuning: random flips; the official code's: open_clip's RandomResizedCrop (0.9-1) "
        "of the image as read for its resize and crop, flips, colour jitter, grey scale, blur; "
        "none (default: flip)")
    add("--alphas", type=C.number(float, 0, 1), nargs="+", default=[i / 10 for i in range(11)],
        help="interpolation weights to evaluate (default: 0, 0.1, ..., 1)")
    add("--alpha", type=C.number(float, 0, 1), default=0.5,
        help="alpha kept without --control (default: 0.5)")
    add("--split-seed", type=C.number(int, 0), default=0, help="seed of the train/val/test "
        "split (default: 0)")
    C.add_run_flags(p, "runs/patch")
    return p.parse_args(argv)


# ============================================================================ the method


def patching_loss(logits, labels, label_smoothing):
    """The fine-tuning loss through the frozen head: cross-entropy for one class per image; for
    (B, C) 0/1 multi-label targets binary cross-entropy, each target moved towards 0.5 by
    label_smoothing / 2 (timm's BinaryCrossEntropy with smooth_dense; the official run's has no
    smooth_dense, so its smoothing=0.2 leaves 0/1 targets: label_smoothing 0)."""
    if labels.ndim == 2:
        from timm.loss import BinaryCrossEntropy
        loss = BinaryCrossEntropy(smoothing=label_smoothing, smooth_dense=True)
        return loss(logits.float(), labels.float())
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def finetune_one_epoch(model, head, batches, optimizer, scheduler, step, args, device):
    """One epoch of fine-tuning the image tower through the frozen zero-shot head W, from step
    `step` on. batches: (CLIP's input images, labels) on the device. Returns the steps' losses."""
    model.train()
    losses = []
    for images, labels in batches:
        with C.autocast(device):
            logits = C.zeroshot_logits(model.encode_image(images), head, model.logit_scale)
            loss = patching_loss(logits, labels, args.label_smoothing)
        C.check_finite(loss, step + len(losses))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.visual.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def interpolate_weights(theta_0, theta_1, alpha):
    """PAINT's patch: theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1 for every tensor of
    the image tower. Integer tensors (BatchNorm's counters in ResNet CLIPs) get the same formula
    rounded, so alpha 0 and 1 give each end exactly."""
    assert theta_0.keys() == theta_1.keys(), "zero-shot and fine-tuned weights have other keys"
    patched = {}
    for key, w0 in theta_0.items():
        w1 = theta_1[key]
        if w0.is_floating_point():
            patched[key] = (1 - alpha) * w0 + alpha * w1
        elif w0.dtype == torch.bool:
            assert torch.equal(w0, w1), f"boolean tensor {key} differs"
            patched[key] = w0.clone()
        else:
            patched[key] = torch.round((1 - alpha) * w0.double() + alpha * w1.double()).to(w0.dtype)
    return patched


def best_alpha(rows):
    """PAINT's choice: the alpha with the best mean of task and control metric (the smallest on
    ties)."""
    return max(rows, key=lambda r: (sum(v for k, v in r.items() if k != "alpha") / 2,
                                    -r["alpha"]))["alpha"]


# ============================================================================ the batches


def finetune_batches(dataset, preprocess_cfg, epoch, step, total_steps, args, device):
    """The batches of one epoch as finetune_one_epoch takes them, up to step `total_steps`:
    CLIP's input (augmented per step) and the labels, on the device."""
    for batch in C.batch_loader(dataset, args.batch_size, train=True, seed=args.seed,
                                epoch=epoch, workers=args.workers, desc=f"epoch {epoch}"):
        augment = augmentation(args.augment, args.seed, step, preprocess_cfg["size"])
        yield (C.clip_input(batch["images"], preprocess_cfg, device, dataset.scenes.pixels,
                            augment), batch["labels"].to(device))
        step += 1
        if step == total_steps:
            return


def augmentation(kind, seed, step, size=None):
    """--augment, a function of a [0, 1] batch: 'flip' random horizontal and vertical flips
    (remote-sensing tiles have no upright); 'official' the official code's: open_clip's
    RandomResizedCrop(size, (0.9, 1)) of the images as read, the flips, then per
    image ColorJitter(0.4, 0.4, 0.4) with p 0.8, RandomGrayscale p 0.2 and GaussianBlur (kernel
    3x7, sigma 0.1-2) with p 0.4; 'none' (None). Drawn from (seed, step) alone, so a resumed run
    augments the same images alike."""
    from torchvision.transforms import RandomResizedCrop, v2
    colour = v2.Compose([v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4)], p=0.8),
                         v2.RandomGrayscale(p=0.2),
                         v2.RandomApply([v2.GaussianBlur((3, 7), sigma=(0.1, 2.0))], p=0.4)])

    def augment(x):
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            torch.manual_seed(seed * 1000003 + step)
            if kind == "official":
                boxes = [RandomResizedCrop.get_params(image, [0.9, 1], [3 / 4, 4 / 3])
                         for image in x]
                x = torch.stack([C.resize_and_crop(image[:, i:i + h, j:j + w], size, "bicubic",
                                                   (0, 1), "squash") for image, (i, j, h, w)
                                 in zip(x, boxes)])
            flip_h, flip_v = (torch.rand(2, len(x)) < 0.5).to(x.device)[:, :, None, None, None]
            x = torch.where(flip_h, x.flip(-1), x)
            x = torch.where(flip_v, x.flip(-2), x)
            return torch.stack([colour(image) for image in x]) if kind == "official" else x
    augment.crops = kind == "official"
    return None if kind == "none" else augment


# ============================================================================ the run


def main(argv=None):
    return C.run_stage(run, parse_args(argv))


def run(args):
    if args.redraw:
        return C.redraw(args.redraw, STAGE, {"alpha.png": plot_alpha}, args.debug)
    device = C.pick_device(args.device)
    if args.control_per_class is not None and not args.control:
        raise C.UserError("--control-per-class N is for a --control data set; pass --control too")
    C.check_run(args.out, STAGE, args.resume, args.overwrite)

    # ------------------------------------------------------------------ data
    train = C.load_split(args.data, args.root, "train", args.split_seed, args.download)
    train = C.with_prompts(train, args.prompts)
    val = C.load_split(args.data, train.root, "val", args.split_seed)
    control = load_control(args) if args.control else None
    train_ds, val_ds, control_ds = (
        C.open_images(scenes, args.cache, args.workers, args.skip_bad_files) if scenes else None
        for scenes in (train, val, control))
    print(f"{args.data}: {len(train_ds)} train / {len(val_ds)} val images of "
          f"{len(train.classes)} classes from {train.root}" + C.left_out_note(train)
          + (f"; control {args.control}: {len(control_ds)} {control.split} images"
             if control else ""))

    # ------------------------------------------------------------------ model, heads, optimizer
    torch.manual_seed(args.seed)  # after the data: packing a --cache draws from torch's generator
    model, tokenizer, clip_config = C.load_clip(args.model, args.pretrained, device)
    head = C.zeroshot_head(model, tokenizer, train.classnames, train.templates, device)
    if control:
        control_head = C.zeroshot_head(model, tokenizer, control.classnames, control.templates,
                                       device)
    model.requires_grad_(False)  # everything frozen but the image tower
    model.visual.requires_grad_(True)
    theta_zeroshot = copy.deepcopy(model.visual.state_dict())
    per_epoch, total_steps, warmup_steps = C.training_steps(len(train_ds), args, 200)
    optimizer = torch.optim.AdamW(model.visual.parameters(), lr=args.lr, weight_decay=args.wd)
    scheduler = C.cosine_schedule(optimizer, total_steps, warmup_steps)
    identity = C.run_identity(args, train_files_sha256=C.sha256_of(train.files))
    states = dict(visual=model.visual, optimizer=optimizer, scheduler=scheduler)

    with C.run_folder(args.out, STAGE, args.resume, args.overwrite) as work:
        start_epoch, step, history = C.restart_from_checkpoint(work, identity, args.resume,
                                                               **states)
        C.write_json(os.path.join(work, "args.json"), C.describe_run(args, device, STAGE))

        # -------------------------------------------------------------- fine-tuning
        print(f"fine-tuning {total_steps} steps ({per_epoch} per epoch, warm-up {warmup_steps})")
        for epoch in range(start_epoch, math.ceil(total_steps / max(1, per_epoch))):
            batches = finetune_batches(train_ds, model.visual.preprocess_cfg, epoch, step,
                                       total_steps, args, device)
            losses = finetune_one_epoch(model, head, batches, optimizer, scheduler, step, args,
                                        device)
            step += len(losses)
            history.append({"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0],
                            "train_loss": sum(losses) / max(1, len(losses))})
            print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f} (step {step}, lr "
                  f"{history[-1]['lr']:.2e})")
            C.save_checkpoint(work, identity, epoch, step, history, **states)
        theta_finetuned = copy.deepcopy(model.visual.state_dict())
        C.save_torch(os.path.join(work, "finetuned.pt"), theta_finetuned)

        # -------------------------------------------------------------- patching: the alpha sweep
        def score(dataset, head):  # the zero-shot metric of the model on a split: (name, value)
            encoder = {"clip": C.clip_encoder(model, dataset.scenes.pixels, device)}
            features, labels, _ = C.embed(dataset, encoder, device, args.batch_size, args.workers)
            return C.zeroshot_score(features["clip"], labels, head, model.logit_scale)
        rows = []
        print(f"{'alpha':>6} {'task':>8} {'control':>8}  (accuracy; mAP for multi-label data)")
        for alpha in sorted(set(args.alphas) | ({args.alpha} if not control else set())):
            theta = interpolate_weights(theta_zeroshot, theta_finetuned, alpha)
            model.visual.load_state_dict(theta)
            model.eval()
            name, value = score(val_ds, head)
            rows.append({"alpha": alpha, f"task_{name}": value})
            if control:
                name, value = score(control_ds, control_head)
                rows[-1][f"control_{name}"] = value
            print(f"{alpha:6.2f} " + " ".join(f"{v:8.4f}" for k, v in rows[-1].items()
                                              if k != "alpha") + ("" if control else f" {'-':>8}"))
        chosen = best_alpha(rows) if control else args.alpha
        print(f"chose alpha {chosen}: best mean of task and control metric" if control else
              f"no --control given: kept --alpha {chosen} (PAINT picks alpha on a control task)")

        # -------------------------------------------------------------- save
        model.visual.load_state_dict(interpolate_weights(theta_zeroshot, theta_finetuned, chosen))
        skipped = {k: v for ds in (train_ds, val_ds, control_ds) if ds
                   for k, v in ds.skipped.items()}
        save_patched(work, model, clip_config, args, train, control, {
            "epochs": history, "alphas": rows, "chosen_alpha": chosen, "steps": step,
            "skipped_files": skipped, "task": {"split": "val", "n_images": len(val.files),
                                               "chance": val.chance}})
    if skipped:
        print(f"skipped {len(skipped)} unreadable files (listed in metrics.json)")
    print(f"wrote {args.out}: patched CLIP (alpha {chosen}); open_clip loads it as "
          f"\"local-dir:{args.out}\"")
    if not args.no_plots:
        C.draw_pictures(args.out, {"alpha.png": plot_alpha}, args.debug)


# ============================================================================ plumbing


def save_patched(work, model, clip_config, args, train, control, metrics):
    """The run's files: train_scenes.txt (stages 2 and 3 check them), the patched CLIP in
    open_clip's folder format, metrics.json and patched.json."""
    with open(os.path.join(work, "train_scenes.txt"), "w") as f:
        f.writelines(f"{i}\n" for i in C.train_ids(train))
    weights = save_clip(model, clip_config, work)
    C.write_json(os.path.join(work, "metrics.json"), {**metrics, "control": control and {
        "dataset": control.dataset, "root": os.path.abspath(control.root),
        "split": control.split, "per_class": args.control_per_class,
        "n_images": len(control.files), "chance": control.chance}})
    C.write_json(os.path.join(work, "patched.json"), {
        "kind": "rsclip-align/patched-clip",
        "model": open_clip_name(args.model, clip_config.get("quick_gelu")),
        "pretrained": args.pretrained, "alpha": metrics["chosen_alpha"], "dataset": args.data,
        "root": os.path.abspath(train.root), "scenes": C.scene_set(args.data, train.root),
        "classes": train.classes, "classnames": train.classnames,
        "templates": list(train.templates), "split_seed": args.split_seed,
        "split_fractions": C.SPLIT_FRACTIONS, "preprocess_cfg": model.visual.preprocess_cfg,
        "train_scenes": "train_scenes.txt",
        "train_scenes_sha256": C.sha256_of(os.path.join(work, "train_scenes.txt")),
        "weights": C.OPEN_CLIP_WEIGHTS, "weights_sha256": C.sha256_of(weights)})


def open_clip_name(model_name, quick_gelu):
    """The open_clip name that rebuilds a CLIP as trained: OpenAI's weights need '-quickgelu'."""
    import open_clip
    quick = f"{model_name}-quickgelu"
    if quick_gelu and not model_name.endswith("-quickgelu") and quick in open_clip.list_models():
        return f"{model_name}-quickgelu"
    return model_name


def save_clip(model, config, folder):
    """A CLIP in open_clip's own folder format ("local-dir:FOLDER", as the Hugging Face hub takes
    it): open_clip_config.json (open_clip's save_config_for_hf: model config, QuickGELU,
    preprocess_cfg) and open_clip_model.safetensors (no pickle). Returns the weights' path."""
    import importlib
    from pathlib import Path

    import safetensors.torch
    hf = importlib.import_module("open_clip.push_to_hf_hub")  # the module, not the function
    weights = os.path.join(folder, C.OPEN_CLIP_WEIGHTS)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, weights)
    os.chmod(weights, 0o644)  # safetensors writes 0600; every other output is 0644
    hf.save_config_for_hf(model, Path(os.path.join(folder, C.OPEN_CLIP_CONFIG)), config)
    return weights


# ============================================================================ the control task


def per_class_subset(scenes, n, seed):
    """At most n scenes of each class, the n with the smallest SHA-256("<seed>/<scene id>") (as
    hashed_split), so the same ones for the same seed whatever else the folders hold."""
    if scenes.multilabel:
        raise C.UserError(f"a per-class subset needs one class per image; {scenes.dataset} is "
                          f"multi-label")
    rank = {i: C.scene_hash(seed, C.scene_id(f)) for i, f in enumerate(scenes.files)}
    keep = [i for c in np.unique(scenes.labels)
            for i in sorted(np.flatnonzero(scenes.labels == c).tolist(), key=rank.get)[:n]]
    return scenes.subset(sorted(keep), scenes.split)


def load_control(args):
    """The control task's images: its validation split, or its test split where it has no other
    (ImageNet's validation set is the test set of every published figure; PAINT picks alpha on it
    too); with --control-per-class, a fixed subset of N images per class."""
    control = C.load_split(args.control, args.control_root, "val", args.split_seed)
    if not control.files:
        control = C.load_split(args.control, args.control_root, "test", args.split_seed)
    if args.control_per_class is not None:
        control = per_class_subset(control, args.control_per_class, args.split_seed)
    if not control.files:
        raise C.UserError(f"the control {args.control} in {control.root} has no images to "
                          f"evaluate; pass another --control-root")
    return control


# ============================================================================ the picture


def plot_alpha(folder):
    """alpha.png from metrics.json: the task's (and control's) validation metric against alpha,
    with its number of images and chance level, the chosen alpha dashed (0: zero-shot, 1:
    fine-tuned); the mean training loss of each epoch."""
    m = C.read_json(os.path.join(folder, "metrics.json"))
    figure, (curve, loss) = C.new_figure(8, 3.8, ncols=2)
    rows = sorted(m["alphas"], key=lambda r: r["alpha"])
    keys = sorted((k for k in rows[0] if k != "alpha"), reverse=True)
    for key, colour in zip(keys, ("tab:blue", "tab:orange")):
        what = m["control"] if key.startswith("control") else m.get("task") or {}
        label = f"control ({what['dataset']})" if key.startswith("control") else "task"
        if "n_images" in what:
            label += f", {what['n_images']} {what['split']} images"
        curve.plot([r["alpha"] for r in rows], [100 * r[key] for r in rows], "o-", color=colour,
                   label=label)
        if what.get("chance") is not None:
            curve.axhline(100 * what["chance"], color=colour, ls=":", lw=1,
                          label=f"chance, {label.split(',')[0]}")
    curve.axvline(m["chosen_alpha"], color="0.3", ls="--", lw=1,
                  label=f"chosen alpha {m['chosen_alpha']:g}")
    curve.set_xticks([0, 0.25, 0.5, 0.75, 1],
                     ["0\nzero-shot", "0.25", "0.5", "0.75", "1\nfine-tuned"])
    curve.set(xlim=(-0.05, 1.05), xlabel="alpha, the weight of the fine-tuned image tower",
              ylabel="mAP (%)" if "task_map" in rows[0] else "top-1 accuracy (%)",
              title="PAINT: zero-shot on the validation splits")
    curve.legend(fontsize=7)
    epochs, losses = [r["epoch"] for r in m["epochs"]], [r["train_loss"] for r in m["epochs"]]
    loss.plot(epochs, losses, "o-")
    C.epoch_axis(loss, epochs, losses)
    loss.set(xlabel="epoch", ylabel="training loss", title="fine-tuning loss (mean over the epoch)")
    return figure


if __name__ == "__main__":
    main()
