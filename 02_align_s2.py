"""Stage 2: align a 13-band Sentinel-2 encoder to the patched CLIP (Zavras et al. 2024, Sec. 3.2).

    python 02_align_s2.py --teacher runs/patch --data eurosat_ms            # the paper's setting
    python 02_align_s2.py --teacher runs/patch --student-weights \\
        B13_vits16_dino_0099_ckpt.pth                                                 # SSL4EO-S12 init
    python 02_align_s2.py --teacher runs/smoke/patch --data eurosat_ms \\
        --root ../shared/data/eurosat_ms_sample --input-size 64 --epochs 1 --out runs/smoke/align  # CPU smoke run

The teacher, the image tower of stage 1's patched CLIP, frozen, sees the RGB composite of each
scene (B04, B03, B02 x 255/3558 for L1C, x 255/2000 for BigEarthNet's L2A) through CLIP's
preprocessing; the student, a ViT-S/16 with a 13-band patch embedding and a linear projection,
sees all 13 bands as reflectance. Loss:
    L = mu * MSE(s, t) + lambda * CE(exp(tau) * normalise(s) @ W, y)      (alignment_loss)
with s, t the student's and teacher's embeddings of the same scene, W the frozen zero-shot head
(the teacher's text tower on this data set's prompts: any Sentinel-2 data set can be aligned to a
CLIP patched on any other), mu = --mse-weight (1) and lambda = --ce-weight (0.05); BCE-with-logits
for multi-label targets. No text is needed and CLIP is not changed. The teacher sees no
augmentation, so its embeddings are computed once per split and cached (teacher_embeddings).
Writes OUT/args.json, log.jsonl, metrics.json, student_init.pt (the student before training,
for stage 3's modality gap "before") and student.pt (weights, architecture, input size,
normalisation, embedding size, the teacher's path and weights hash, the data set, its prompts and
the training scenes); last, training.png (the losses and the validation metric per epoch) from
metrics.json (--no-plots: not).
"""
import argparse
import os


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="runs/patch", help="stage 1's run folder, the patched CLIP (default: runs/patch)")
    p.add_argument("--data", default="eurosat_ms", help="Sentinel-2 data set: eurosat_ms, bigearthnet19, "
                   "bigearthnet43, bigearthnet5 (default: eurosat_ms)")
    p.add_argument("--root", default=None, help="its folder (default: data/<name>, see README)")
    p.add_argument("--prompts", default=None, help="JSON file of class names and/or templates for the text head "
                   "(default: the teacher's prompts on the data it was patched on, else the data set's own; README)")
    p.add_argument("--student", default="vit_small_patch16_224", help="timm architecture (default: vit_small_patch16_224)")
    p.add_argument("--input-size", type=int, default=None, help="student input side in pixels (default: the timm model's, 224)")
    p.add_argument("--student-weights", default=None, help="SSL4EO-S12-style backbone checkpoint (default: random init)")
    p.add_argument("--student-weights-bands", default="ssl4eo", choices=("ssl4eo", "eurosat"),
                   help="band order of that checkpoint's patch embedding: SSL4EO-S12's (B8A after B08) or "
                        "EuroSAT's (B8A last) (default: ssl4eo)")
    p.add_argument("--mse-weight", type=float, default=1.0, help="weight of the MSE to the teacher (default: 1; "
                   "0 with --ce-weight > 0 is the paper's CE-only ablation)")
    p.add_argument("--ce-weight", type=float, default=0.05, help="lambda, weight of the text-head loss (default: 0.05; "
                   "0 is the paper's MSE-only ablation)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: no limit)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default: 256)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default: 1e-4)")
    p.add_argument("--wd", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps, capped at a tenth of the run (default: 200)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient L2 norm (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the student's init and the data order (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loader processes (default: one per core, up to 8)")
    p.add_argument("--cache", default=None, help="folder for packed splits and teacher embeddings (default: none; "
                   "teacher embeddings then go to --out)")
    p.add_argument("--out", default="runs/align", help="run folder (default: runs/align)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: 500)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--skip-bad-files", action="store_true", help="skip unreadable tifs, count them")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--no-plots", action="store_true",
                   help="do not draw the run's pictures (default: draw them when matplotlib is installed)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and flag errors answer here, before torch and the models are imported (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402


def alignment_loss(student_emb, teacher_emb, head, logit_scale, labels, ce_weight, mse_weight=1.0):
    """The paper's objective, L = mu * MSE(s, t) + lambda * CE(exp(tau) * normalise(s) @ W, y), mu = 1.

    s, t: (B, D) student and teacher embeddings (unnormalised, as CLIP's image tower outputs);
    W: the frozen zero-shot head; labels: (B,) class ids, or (B, C) 0/1 targets for multi-label
    data, which use binary cross-entropy with logits. mu = --mse-weight and lambda = --ce-weight
    give the paper's loss ablation (MSE only: lambda 0; CE only: mu 0). Returns (L, MSE, CE)."""
    mse = F.mse_loss(student_emb.float(), teacher_emb.float())
    logits = C.zeroshot_logits(student_emb, head, logit_scale)
    if labels.ndim == 2:
        ce = F.binary_cross_entropy_with_logits(logits, labels.float())
    else:
        ce = F.cross_entropy(logits, labels)
    return mse_weight * mse + ce_weight * ce, mse, ce


def load_backbone_weights(student, path, bands):
    """Load an SSL4EO-S12-style checkpoint into the student's backbone: a state dict, or one under
    'model' / 'state_dict' / 'teacher', with prefixes such as 'module.' or 'backbone.' stripped.
    The patch embedding's input channels are reordered from `bands` to S2_BANDS, and a position
    embedding of another grid size is resampled. Stops when a shape disagrees or when fewer than
    90% of the backbone's tensors would load, or when two tensors would load into one (a MoCo
    checkpoint loads its base encoder, not the momentum encoder)."""
    ckpt = C.load_torch(path, "student weights", "pass an SSL4EO-S12-style checkpoint with --student-weights")
    for key in ("model", "state_dict", "teacher"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    target = student.backbone.state_dict()
    loaded, source, unexpected = {}, {}, []
    momentum = {k for k in ckpt if "momentum_encoder." in k}  # MoCo keeps two encoders: use the base one,
    for key in ckpt:                                           # the one SSL4EO-S12 and MoCo v3 evaluate
        if key in momentum:
            continue
        name = key
        while name not in target and "." in name:  # strip 'module.', 'backbone.', 'base_encoder.', ...
            name = name.split(".", 1)[1]
        if name not in target:
            unexpected.append(key)
        elif name in loaded:
            raise C.UserError(f"--student-weights {path}: both {source[name]} and {key} would load into {name}; "
                              f"pass a checkpoint with one encoder (or a plain state dict of it)")
        else:
            loaded[name], source[name] = ckpt[key], key
    if momentum:
        print(f"skipped the {len(momentum)} tensors of the MoCo momentum encoder; loading the base encoder")
    proj = "patch_embed.proj.weight"
    if proj in loaded and bands == "ssl4eo" and loaded[proj].shape[1] == len(C.S2_BANDS):
        loaded[proj] = loaded[proj][:, [C.SSL4EO_BANDS.index(b) for b in C.S2_BANDS]]
    if "pos_embed" in loaded and loaded["pos_embed"].shape != target["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed
        grid = student.backbone.patch_embed.grid_size
        loaded["pos_embed"] = resample_abs_pos_embed(loaded["pos_embed"], list(grid),
                                                     num_prefix_tokens=student.backbone.num_prefix_tokens)
        print(f"resampled the position embedding to a {grid[0]}x{grid[1]} grid")
    for name, value in loaded.items():
        if value.shape != target[name].shape:
            raise C.UserError(f"--student-weights {path}: {name} has shape {tuple(value.shape)}, the {len(C.S2_BANDS)}-band "
                              f"{student.backbone.__class__.__name__} needs {tuple(target[name].shape)}; pass a {len(C.S2_BANDS)}-band checkpoint of this "
                              f"architecture (--student)")
    missing = [k for k in target if k not in loaded]
    print(f"loaded {len(loaded)}/{len(target)} backbone tensors from {path}")
    print(f"  missing: {missing or 'none'}\n  unexpected: {unexpected or 'none'}")
    if len(loaded) < 0.9 * len(target):
        raise C.UserError(f"--student-weights {path} holds only {len(loaded)} of the {len(target)} tensors of the "
                          f"backbone; pass a checkpoint of the architecture named by --student")
    student.backbone.load_state_dict(loaded, strict=False)


@torch.no_grad()
def teacher_embeddings(teacher, meta, dataset, scenes, args, device, bad):
    """The teacher's embedding of the RGB composite of every image of a split, in dataset order,
    computed once and cached in a file keyed on the teacher's weights, the data, split and
    preprocessing (the teacher is frozen and sees no augmentation). Rows of skipped files are NaN."""
    preprocess_cfg = teacher.visual.preprocess_cfg  # as open_clip rebuilt it from stage 1's folder
    key = {"teacher_sha256": meta["weights_sha256"], "scenes": C.scenes_key(scenes), "preprocess_cfg": preprocess_cfg}
    path = os.path.join(args.cache or args.out, f"teacher-{C.sha256_of(key)[:16]}.pt")
    if os.path.isfile(path):
        cached = C.load_torch(path, "teacher cache", f"delete {path}")
        if cached.get("key") == C.sha256_of(key):
            return cached["embeddings"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    loader = C.batch_loader(dataset, args.batch_size, workers=args.workers, pin_memory=device.type == "cuda")
    prepare = lambda raw: C.clip_input(raw, preprocess_cfg, device, pixels=scenes.pixels)  # noqa: E731
    features, _, index = C.embed(teacher.encode_image, loader, prepare,
                                 device, args.skip_bad_files, bad, desc=f"teacher {scenes.split}")
    embeddings = torch.full((len(dataset), features.shape[1]), float("nan"))
    embeddings[index] = features
    C.save_torch(path, {"key": C.sha256_of(key), "embeddings": embeddings})
    return embeddings


@torch.no_grad()
def validate(student, dataset, teacher_emb, head, logit_scale, args, device, bad):
    """Validation MSE to the teacher and the student's zero-shot score through the text head:
    (mse, metric name ('acc', or 'map' for multi-label data), value)."""
    student.eval()
    loader = C.batch_loader(dataset, args.batch_size, workers=args.workers, pin_memory=device.type == "cuda")
    prepare = lambda raw: C.ms_input(raw, student.input_size, device, pixels=dataset.scenes.pixels)  # noqa: E731
    features, labels, index = C.embed(student, loader, prepare, device, args.skip_bad_files, bad, desc="val")
    mse = F.mse_loss(features, teacher_emb[index]).item()
    return (mse, *C.zeroshot_score(C.zeroshot_logits(features, head.cpu(), logit_scale.cpu()), labels))


def main(argv=None):
    args = parse_args(argv)
    with C.Session(args.debug) as session:
        return run(args, argv, session)


def run(args, argv, session):
    # ------------------------------------------------------------------ setup
    device = C.pick_device(args.device)
    C.check_run_dir(args.out, "student.pt", args.overwrite, args.resume)
    bad = {}  # path -> reason, for --skip-bad-files

    # ------------------------------------------------------------------ teacher
    teacher, meta, tokenizer = C.load_teacher(args.teacher, device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    logit_scale = teacher.logit_scale.detach()

    # ------------------------------------------------------------------ data (with the teacher's split seed)
    # On the scenes the teacher was patched on, its split seed keeps its training scenes out of
    # the student's validation split and out of stage 3's test split; other data sets use it too.
    train = C.load_split(args.data, args.root, "train", meta["split_seed"])
    if train.modality != "ms":
        raise C.UserError(f"the student reads Sentinel-2 bands, --data {args.data} is RGB; pass "
                          + " or ".join(f"--data {n}" for n in C.MS_DATASETS))
    val = C.load_split(args.data, train.root, "val", meta["split_seed"])
    if "train_scenes" in meta:  # the teacher chose alpha on these val scenes: it must not have trained on them
        teacher_scenes = C.read_scenes(os.path.join(C.patched_folder(args.teacher), meta["train_scenes"]),
                                       meta["train_scenes_sha256"])
        C.check_held_out(val, teacher_scenes, f"--teacher {args.teacher}")
    # the CE term's prompts: the teacher's own on the scenes it was patched on, else the data set's (or --prompts)
    train = C.head_prompts(train, [meta] if C.trained_on(meta, train) else [], args.prompts)
    # the frozen text head W of the CE term: the teacher's text tower on this data set's prompts
    head = C.zeroshot_head(teacher, tokenizer, train.classnames, train.templates, device)
    train_ds = C.open_images(train, args.cache, args.workers)
    val_ds = C.open_images(val, args.cache, args.workers)
    print(f"{args.data}: {len(train_ds)} train / {len(val_ds)} val scenes of {len(train.classes)} classes from "
          f"{train.root} (split seed {meta['split_seed']}, from the teacher)" + C.left_out_note(train))

    # ------------------------------------------------------------------ student and the teacher's targets
    embed_dim = teacher.visual.output_dim  # CLIP's joint embedding size
    torch.manual_seed(args.seed)
    student = C.Student(args.student, embed_dim, args.input_size)
    if args.student_weights:
        load_backbone_weights(student, args.student_weights, args.student_weights_bands)
    student.to(device)

    # ------------------------------------------------------------------ run folder (every input is checked)
    C.lock_run_dir(session, args.out, args.resume)
    session.on_stop = C.stop_note(args.out, __file__, argv)
    record = lambda: {**C.student_record(student, args.student, meta, args.teacher, train),  # noqa: E731
                      "train_scenes": sorted(map(C.scene_id, train.files))}  # stage 3 checks its test scenes
    if not args.resume:
        C.save_torch(os.path.join(args.out, "student_init.pt"), record())
    print(f"student {args.student}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters, "
          f"{student.input_size}px input, projection to {embed_dim}-d")
    train_targets = teacher_embeddings(teacher, meta, train_ds, train, args, device, bad)
    val_targets = teacher_embeddings(teacher, meta, val_ds, val, args, device, bad)

    # ------------------------------------------------------------------ training
    batches_per_epoch = C.training_batches(len(train_ds), args.batch_size)
    total_steps = args.epochs * batches_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = min(args.warmup, total_steps // 10)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.wd)
    scheduler = C.cosine_schedule(optimizer, total_steps, warmup_steps)
    state = dict(student=student, optimizer=optimizer, scheduler=scheduler)
    step, epoch, start_batch = 0, 0, 0
    progress = {"running": {"loss": 0.0, "mse": 0.0, "ce": 0.0, "batches": 0}, "history": []}
    if args.resume:
        step, epoch, start_batch, progress = C.load_training_state(args.out, args, **state)
        print(f"resumed {args.out}/last.pt at step {step} of {total_steps} (epoch {epoch}, batch {start_batch})")
    C.write_json(os.path.join(args.out, "args.json"), C.describe_run(args, device))

    def close_epoch(this_epoch):
        sums = progress["running"]  # this epoch's loss sums, kept in last.pt
        val_mse, metric, val_score = validate(student, val_ds, val_targets, head, logit_scale, args, device, bad)
        n = max(1, sums["batches"])
        row = {"epoch": this_epoch, "step": step, "lr": scheduler.get_last_lr()[0], "train_loss": sums["loss"] / n,
               "train_mse": sums["mse"] / n, "train_ce": sums["ce"] / n, "val_mse": val_mse, f"val_{metric}": val_score}
        C.end_epoch(args.out, args, row, step, epoch, start_batch, progress, **state)
        print(f"epoch {this_epoch}: train mse {row['train_mse']:.4f} ce {row['train_ce']:.4f} | "
              f"val mse {val_mse:.4f} zero-shot {metric} {val_score:.4f}")

    print(f"training {total_steps} steps ({batches_per_epoch} per epoch, warm-up {warmup_steps})")
    with session.deferred():  # Ctrl-C / SIGTERM: finish the step, save last.pt, stop
        while step < total_steps:
            student.train()
            loader = C.batch_loader(train_ds, args.batch_size, shuffle=True, seed=args.seed, epoch=epoch,
                                    start_batch=start_batch, workers=args.workers, pin_memory=device.type == "cuda")
            sums = progress["running"]
            this_epoch = epoch
            bar = C.progress_bar(loader, desc=f"epoch {epoch}", initial=start_batch, total=batches_per_epoch)
            for batch_in_epoch, batch in enumerate(bar, start=start_batch + 1):
                C.check_bad_files(batch, args.skip_bad_files, bad)
                if len(batch["index"]) == 0:
                    continue
                images = C.ms_input(batch["images"], student.input_size, device, pixels=train.pixels)
                targets = train_targets[batch["index"]].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
                with C.autocast(device):
                    loss, mse, ce = alignment_loss(student(images), targets, head, logit_scale, labels,
                                                   args.ce_weight, args.mse_weight)
                C.check_finite(loss, step, args.out)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                for name, value in (("loss", loss), ("mse", mse), ("ce", ce)):
                    sums[name] += value.item()
                sums["batches"] += 1
                bar.set_postfix(mse=f"{mse.item():.4f}", ce=f"{ce.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                C.checkpoint_step(session, args.out, args, step, epoch, batch_in_epoch, progress, **state)
                if step >= total_steps:
                    break
            else:  # the epoch ran to its end
                epoch, start_batch = epoch + 1, 0
            close_epoch(this_epoch)
        if progress["running"]["batches"]:  # stopped on the very last step: its epoch's row is still to write
            close_epoch(epoch)

    # ------------------------------------------------------------------ save
    C.save_torch(os.path.join(args.out, "student.pt"), record())
    C.write_json(os.path.join(args.out, "metrics.json"), {
        "epochs": progress["history"], "steps": step, "teacher": args.teacher,
        "teacher_sha256": meta["weights_sha256"], "skipped_files": bad})
    if os.path.exists(os.path.join(args.out, "last.pt")):
        os.remove(os.path.join(args.out, "last.pt"))  # the run is finished; student.pt keeps its weights
    if bad:
        print(f"skipped {len(bad)} unreadable files (listed in metrics.json)")
    print(f"wrote {args.out}/student.pt")
    C.draw_pictures(args.out, session, draw=not args.no_plots)  # training.png, from metrics.json
    return {"student": student, "teacher": teacher, "head": head, "metrics": progress["history"]}


if __name__ == "__main__":
    main()
