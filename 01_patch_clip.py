"""Stage 1: patch an open_clip CLIP on remote-sensing RGB images (PAINT, Ilharco et al. 2022).

    python 01_patch_clip.py --data eurosat --control resisc45          # the paper's setting
    python 01_patch_clip.py --data bigearthnet19 --label-smoothing 0.2 --control imagenet \\
        --control-root data/imagenet/val --control-per-class 10        # PAINT's supported task as control
    python 01_patch_clip.py --data eurosat_ms --root data/EuroSAT_MS   # RGB composites of the tifs
    python 01_patch_clip.py --model ViT-S-32 --pretrained none --data eurosat_ms \\
        --root ../shared/data/eurosat_ms_sample --epochs 1 --out runs/smoke/patch   # CPU smoke run

1. Zero-shot head W from class names x prompt templates with the text tower (frozen).
2. Fine-tune the image tower with cross-entropy through W (binary cross-entropy for multi-label
   data such as BigEarthNet; AdamW, warm-up + cosine, grad clip).
3. Interpolate every weight of the image tower, theta(a) = (1 - a) theta_zs + a theta_ft, for each
   a in --alphas; evaluate each on the task's validation split (accuracy; mAP for multi-label data)
   and, with --control, zero-shot on a control data set; keep the a that maximises their mean (PAINT's rule).
Writes OUT/args.json, log.jsonl, metrics.json, finetuned.pt (the fine-tuned image tower),
train_scenes.txt (the scenes it trained on, which stage 3 checks) and the patched CLIP in
open_clip's own folder format: open_clip_config.json (model config and preprocessing) and
open_clip_model.safetensors, so that open_clip.create_model_and_transforms("local-dir:OUT")
rebuilds it; patched.json (alpha, classes, prompts, split, weights hash) is written last and marks
the run as finished. Stages 2 and 3 take OUT as --teacher / --ckpt. Last, alpha.png (the alpha
sweep and the training loss) is drawn from metrics.json (--no-plots: not).
"""
import argparse
import copy
import os


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="eurosat", help="task data set: eurosat, eurosat_ms, bigearthnet19, ... "
                   "(the README's data table; default: eurosat)")
    p.add_argument("--root", default=None, help="its folder (default: data/<name>, see README)")
    p.add_argument("--download", action="store_true", help="download EuroSAT RGB with torchvision first")
    p.add_argument("--control", default=None,
                   help="control data set, evaluated zero-shot to pick alpha: resisc45, imagenet, ... (default: none; "
                        "PAINT: imagenet)")
    p.add_argument("--control-root", default=None, help="its folder (default: data/<name>)")
    p.add_argument("--control-per-class", type=int, default=None, metavar="N",
                   help="evaluate the control on N images per class, the same ones for the same --split-seed "
                        "(default: all of its split; e.g. 10 for ImageNet's 50,000)")
    p.add_argument("--prompts", default=None, help="JSON file of class names and/or templates for the task's head "
                   "(default: the data set's own; README)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32)")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip tag, local checkpoint path, or 'none' for random weights (default: openai)")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (default: 5, PAINT; the paper's "
                   "released BigEarthNet config used 1 epoch)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: no limit)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate (default: 1e-5)")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (default: 0.1, PAINT; the paper's "
                   "released config used 0.5)")
    p.add_argument("--warmup", type=int, default=200,
                   help="linear warm-up steps, capped at a tenth of the run (default: 200)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the fine-tuning loss, 0..1 (default: 0.0; the official code uses 0.2 "
                        "for BigEarthNet)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient L2 norm (default: 1.0)")
    p.add_argument("--augment", default="flip", choices=("flip", "none"),
                   help="random horizontal/vertical flips during fine-tuning (default: flip)")
    p.add_argument("--alphas", type=float, nargs="+", default=[i / 10 for i in range(11)],
                   help="interpolation weights to evaluate (default: 0, 0.1, ..., 1)")
    p.add_argument("--alpha", type=float, default=0.5, help="alpha kept when no --control is given (default: 0.5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and augmentation (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loader processes (default: one per core, up to 8)")
    p.add_argument("--cache", default=None, help="folder for packed, memory-mapped splits (default: none)")
    p.add_argument("--out", default="runs/patch", help="run folder (default: runs/patch)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: 500)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--skip-bad-files", action="store_true", help="skip unreadable images, count them")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--no-plots", action="store_true",
                   help="do not draw the run's pictures (default: draw them when matplotlib is installed)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and flag errors answer here, before torch and the models are imported (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402


def interpolate_weights(theta_0, theta_1, alpha):
    """PAINT's patch: theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1 for every tensor of the
    image tower. Integer tensors are counters, not weights (BatchNorm's num_batches_tracked in the
    ResNet CLIPs, which fine-tuning advances): they get the same formula rounded to a whole number,
    so alpha 0 and 1 give back each end exactly. BatchNorm reads that counter only when its
    momentum is None, which no open_clip model uses, so it never changes an output."""
    assert theta_0.keys() == theta_1.keys(), "zero-shot and fine-tuned weights have different keys"
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


def patching_loss(logits, labels, label_smoothing):
    """The fine-tuning loss through the frozen head: cross-entropy for one class per image; for
    (B, C) 0/1 multi-label targets binary cross-entropy with each target moved towards 0.5 by
    label_smoothing / 2 (timm's BinaryCrossEntropy with smooth_dense)."""
    if labels.ndim == 2:
        from timm.loss import BinaryCrossEntropy
        return BinaryCrossEntropy(smoothing=label_smoothing, smooth_dense=True)(logits.float(), labels.float())
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def zeroshot_score(model, head, dataset, preprocess_cfg, args, device, bad):
    """Zero-shot top-1 accuracy, or mean average precision for multi-label data, of `model`
    through `head` on a dataset of raw images: (metric name, value)."""
    loader = C.batch_loader(dataset, args.batch_size, workers=args.workers, pin_memory=device.type == "cuda")
    pixels = dataset.scenes.pixels
    features, labels, _ = C.embed(model.encode_image, loader,
                                  lambda raw: C.clip_input(raw, preprocess_cfg, device, pixels=pixels),
                                  device, args.skip_bad_files, bad, desc="eval")
    return C.zeroshot_score(C.zeroshot_logits(features, head.cpu(), model.logit_scale.detach().cpu()), labels)


def load_control(args):
    """The control task's images: its validation split, or its test split where it has no other
    (ImageNet's validation set is the test set of every published figure; PAINT picks alpha on it
    too); with --control-per-class, a fixed subset of N images per class."""
    control = C.load_split(args.control, args.control_root, "val", args.split_seed)
    if not control.files:
        control = C.load_split(args.control, args.control_root, "test", args.split_seed)
    if args.control_per_class is not None:
        control = C.per_class_subset(control, args.control_per_class, args.split_seed)
    if not control.files:
        raise C.UserError(f"the control {args.control} in {control.root} has no images to evaluate; pass another "
                          f"--control-root")
    return control


def main(argv=None):
    args = parse_args(argv)
    with C.Session(args.debug) as session:
        run(args, argv, session)


def run(args, argv, session):
    # ------------------------------------------------------------------ setup
    device = C.pick_device(args.device)
    if args.control_per_class is not None and (not args.control or args.control_per_class < 1):
        raise C.UserError(f"--control-per-class {args.control_per_class}: pass a number of images >= 1, with --control")
    C.check_run_dir(args.out, "patched.json", args.overwrite, args.resume)
    torch.manual_seed(args.seed)
    bad = {}  # path -> reason, for --skip-bad-files

    # ------------------------------------------------------------------ data
    train = C.with_prompts(C.load_split(args.data, args.root, "train", args.split_seed, args.download), args.prompts)
    val = C.load_split(args.data, train.root, "val", args.split_seed)
    train_ds = C.open_images(train, args.cache, args.workers)
    val_ds = C.open_images(val, args.cache, args.workers)
    control = control_ds = None
    if args.control:
        control = load_control(args)
        control_ds = C.open_images(control, args.cache, args.workers)
    print(f"{args.data}: {len(train_ds)} train / {len(val_ds)} val images of {len(train.classes)} classes "
          f"from {train.root}" + C.left_out_note(train) + (f"; control {args.control}: {len(control_ds)} "
          f"{control.split} images" if control else ""))

    # ------------------------------------------------------------------ model and zero-shot head
    model, tokenizer, clip_config = C.load_clip(args.model, args.pretrained, device)
    preprocess_cfg = model.visual.preprocess_cfg  # the tag's (or the local-dir's) own preprocessing
    head = C.zeroshot_head(model, tokenizer, train.classnames, train.templates, device)
    control_head = C.zeroshot_head(model, tokenizer, control.classnames, control.templates, device) \
        if control else None
    for p in model.parameters():  # everything frozen but the image tower
        p.requires_grad_(False)
    for p in model.visual.parameters():
        p.requires_grad_(True)
    theta_zeroshot = copy.deepcopy(model.visual.state_dict())

    # ------------------------------------------------------------------ run folder (every input is checked)
    C.lock_run_dir(session, args.out, args.resume, stale=("last.pt", "log.jsonl", "alphas.jsonl"))
    session.on_stop = C.stop_note(args.out, __file__, argv)
    batches_per_epoch = C.training_batches(len(train_ds), args.batch_size)
    total_steps = args.epochs * batches_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = min(args.warmup, total_steps // 10)
    optimizer = torch.optim.AdamW(model.visual.parameters(), lr=args.lr, weight_decay=args.wd)
    scheduler = C.cosine_schedule(optimizer, total_steps, warmup_steps)
    state = dict(visual=model.visual, optimizer=optimizer, scheduler=scheduler)
    step, epoch, start_batch = 0, 0, 0
    progress = {"running": {"loss": 0.0, "batches": 0}, "history": []}  # this epoch's loss sums, the epoch log
    if args.resume:
        step, epoch, start_batch, progress = C.load_training_state(args.out, args, **state)
        print(f"resumed {args.out}/last.pt: " + (f"step {step} of {total_steps} (epoch {epoch}, batch {start_batch})"
              if step < total_steps else "training had finished; going on with the alpha sweep"))
    C.write_json(os.path.join(args.out, "args.json"), C.describe_run(args, device))

    # ------------------------------------------------------------------ fine-tuning
    def close_epoch(this_epoch):
        sums = progress["running"]
        row = {"epoch": this_epoch, "step": step, "lr": scheduler.get_last_lr()[0],
               "train_loss": sums["loss"] / max(1, sums["batches"])}
        C.end_epoch(args.out, args, row, step, epoch, start_batch, progress, **state)
        print(f"epoch {this_epoch}: train loss {row['train_loss']:.4f} (step {step}, lr {row['lr']:.2e})")

    if step < total_steps:
        print(f"fine-tuning {total_steps} steps ({batches_per_epoch} per epoch, warm-up {warmup_steps})")
    with session.deferred():  # Ctrl-C / SIGTERM: finish the step, save last.pt, stop
        while step < total_steps:
            model.train()
            loader = C.batch_loader(train_ds, args.batch_size, shuffle=True, seed=args.seed, epoch=epoch,
                                    start_batch=start_batch, workers=args.workers, pin_memory=device.type == "cuda")
            sums = progress["running"]
            this_epoch = epoch
            bar = C.progress_bar(loader, desc=f"epoch {epoch}", initial=start_batch, total=batches_per_epoch)
            for batch_in_epoch, batch in enumerate(bar, start=start_batch + 1):
                C.check_bad_files(batch, args.skip_bad_files, bad)
                if len(batch["index"]) == 0:
                    continue
                flips = (args.seed, step) if args.augment == "flip" else None
                images = C.clip_input(batch["images"], preprocess_cfg, device, flip_seed_step=flips,
                                      pixels=train.pixels)
                labels = batch["labels"].to(device)
                with C.autocast(device):
                    logits = C.zeroshot_logits(model.encode_image(images), head, model.logit_scale)
                    loss = patching_loss(logits, labels, args.label_smoothing)
                C.check_finite(loss, step, args.out)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.visual.parameters(), args.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                sums["loss"] += loss.item()
                sums["batches"] += 1
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                C.checkpoint_step(session, args.out, args, step, epoch, batch_in_epoch, progress, **state)
                if step >= total_steps:
                    break
            else:  # the epoch ran to its end
                epoch, start_batch = epoch + 1, 0
            close_epoch(this_epoch)
        if progress["running"]["batches"]:  # stopped on the very last step: its epoch's row is still to write
            close_epoch(epoch)
    theta_finetuned = copy.deepcopy(model.visual.state_dict())
    C.save_torch(os.path.join(args.out, "finetuned.pt"), theta_finetuned)

    # ------------------------------------------------------------------ patching
    alphas = sorted(set(args.alphas) | ({args.alpha} if not control else set()))
    done_path = os.path.join(args.out, "alphas.jsonl")  # the sweep so far: a resumed run skips these
    done = {round(row["alpha"], 6): row for row in C.read_jsonl(done_path)} if os.path.exists(done_path) else {}
    rows = []
    print(f"{'alpha':>6} {'task':>8} {'control':>8}  (accuracy; mAP for multi-label data)")
    for alpha in alphas:
        row = done.get(round(alpha, 6))
        if row is None:
            model.visual.load_state_dict(interpolate_weights(theta_zeroshot, theta_finetuned, alpha))
            model.eval()
            name, value = zeroshot_score(model, head, val_ds, preprocess_cfg, args, device, bad)
            row = {"alpha": alpha, f"task_{name}": value}
            if control:
                name, value = zeroshot_score(model, control_head, control_ds, preprocess_cfg, args, device, bad)
                row[f"control_{name}"] = value
            C.append_jsonl(done_path, row)
        rows.append(row)
        print(f"{alpha:6.2f} " + " ".join(f"{v:8.4f}" for k, v in row.items() if k != "alpha")
              + ("" if control else f" {'-':>8}"))
    if control:  # PAINT: the alpha with the best mean of task and control metric (the smallest on ties)
        chosen = max(rows, key=lambda r: (sum(v for k, v in r.items() if k != "alpha") / 2, -r["alpha"]))["alpha"]
        print(f"chose alpha {chosen}: best mean of task and control metric")
    else:
        chosen = args.alpha
        print(f"no --control given: kept --alpha {chosen} (PAINT picks alpha on a control task)")

    # ------------------------------------------------------------------ save
    model.visual.load_state_dict(interpolate_weights(theta_zeroshot, theta_finetuned, chosen))
    train_scenes_sha256 = C.write_scenes(os.path.join(args.out, "train_scenes.txt"), train)  # stage 3 checks them
    weights = C.save_clip(model, clip_config, args.out)  # open_clip's folder format: "local-dir:OUT"
    control_info = control and {"dataset": control.dataset, "root": os.path.abspath(control.root), "split": control.split,
                                "per_class": args.control_per_class, "n_images": len(control.files)}
    C.write_json(os.path.join(args.out, "metrics.json"), {
        "epochs": progress["history"], "alphas": rows, "chosen_alpha": chosen, "control": control_info, "steps": step,
        "skipped_files": bad})
    C.write_json(os.path.join(args.out, "patched.json"), {  # written last: it marks the run as finished
        "kind": "rsclip-align/patched-clip", "model": C.open_clip_name(args.model, clip_config.get("quick_gelu")),
        "pretrained": args.pretrained, "alpha": chosen, "dataset": args.data, "root": os.path.abspath(train.root),
        "scenes": C.scene_set(args.data, train.root), "classes": train.classes,
        "classnames": train.classnames, "templates": list(train.templates), "split_seed": args.split_seed,
        "split_fractions": C.SPLIT_FRACTIONS, "preprocess_cfg": preprocess_cfg,
        "train_scenes": "train_scenes.txt", "train_scenes_sha256": train_scenes_sha256,
        "weights": C.OPEN_CLIP_WEIGHTS, "weights_sha256": C.sha256_of(weights)})
    for scratch in ("last.pt", "alphas.jsonl"):  # the run is finished; finetuned.pt keeps the fine-tuned tower
        if os.path.exists(os.path.join(args.out, scratch)):
            os.remove(os.path.join(args.out, scratch))
    if bad:
        print(f"skipped {len(bad)} unreadable files (listed in metrics.json)")
    print(f"wrote {args.out}: patched CLIP (alpha {chosen}); open_clip loads it as \"local-dir:{args.out}\"")
    C.draw_pictures(args.out, session, draw=not args.no_plots)  # alpha.png, from metrics.json


if __name__ == "__main__":
    main()
