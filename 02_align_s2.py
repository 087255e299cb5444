"""Stage 2: align a Sentinel-2 encoder to the patched CLIP (Zavras et al. 2024, Sec. 3.2).

    python 02_align_s2.py --teacher runs/patch --data eurosat_ms       # the official run: README
    python 02_align_s2.py --teacher runs/patch \\
        --student-weights B13_vits16_dino_0099_ckpt.pth                # SSL4EO-S12 init
    python 02_align_s2.py --teacher runs/smoke/patch --data eurosat_ms \\
        --root ../shared/data/eurosat_ms_sample --input-size 64 --epochs 1 \\
        --out runs/smoke/align                                         # CPU smoke run

The teacher, stage 1's patched CLIP image tower, frozen, sees the RGB composite of each scene
through CLIP's preprocessing; the student, a ViT-S/16 with a 13-band patch embedding and a
linear projection, sees all 13 bands as reflectance. Loss (alignment_loss):
    L = mu * MSE(s, t) + lambda * CE(exp(tau) * normalise(s) @ W, y)
s, t: the student's and teacher's embeddings of the same scene; W: the frozen zero-shot head
(the teacher's text tower on this data set's prompts); mu = --mse-weight (1), lambda =
--ce-weight (0.05); BCE for multi-label targets. No text is needed and CLIP is not changed.
Writes OUT/: args.json, log.jsonl, metrics.json, student_init.pt (the untrained student, for
stage 3's gap "before"), student.pt (weights, architecture, teacher, data, prompts, training
scenes) and training.png.
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F

import common as C

STAGE = "02_align_s2.py"


def parse_args(argv=None):
    p = C.Flags(__doc__)
    add = p.add_argument
    add("--teacher", default="runs/patch", help="stage 1's run folder, or a released patched "
        "CLIP file (default: runs/patch)")
    add("--model", help="a released teacher's base model (default: its name's)")
    add("--pretrained", help="its tag or weights file (default: its name's)")
    add("--data", default="eurosat_ms", help="Sentinel-2 data set: eurosat_ms, "
        "bigearthnet19/43/5, ... (default: eurosat_ms)")
    add("--root", help="its folder (default: data/<name>, see README)")
    add("--download", action="store_true", help="download EuroSAT MS first")
    add("--prompts", help="JSON file of class names and/or templates for the text head "
        "(default: the teacher's on its own data, else the data set's; docs/evaluation.md)")
    add("--student", default="vit_small_patch16_224", help="timm architecture "
        "(default: vit_small_patch16_224)")
    add("--input-size", type=C.number(int, 1), help="student input side in pixels (default: "
        "the timm model's, 224)")
    add("--drop-path", type=C.number(float, 0, 1), default=0.2, help="the student's stochastic "
        "depth rate (default: 0.2)")
    add("--student-weights", help="SSL4EO-S12-style backbone checkpoint (default: random init)")
    add("--student-weights-bands", default="ssl4eo", choices=("ssl4eo", "eurosat"),
        help="band order of its patch embedding: SSL4EO-S12's (B8A after B08) or EuroSAT's "
        "(B8A last) (default: ssl4eo)")
    add("--mse-weight", type=C.number(float, 0), default=1.0, help="mu, weight of the MSE to "
        "the teacher (default: 1; 0: the paper's CE-only ablation)")
    add("--ce-weight", type=C.number(float, 0), default=0.05, help="lambda, weight of the "
        "text-head loss (default: 0.05; 0: the paper's MSE-only ablation)")
    add("--epochs", type=C.number(int, 1), default=5, help="training epochs (default: 5)")
    add("--max-steps", type=C.number(int, 1), help="stop after this many steps (default: none)")
    add("--batch-size", type=C.number(int, 1), default=256, help="images per step (default: 256)")
    add("--lr", type=C.number(float, 0, above=True), default=1e-4,
        help="peak AdamW learning rate (default: 1e-4)")
    add("--wd", type=C.number(float, 0), default=0.01, help="AdamW weight decay (default: 0.01)")
    add("--warmup", type=C.number(int, 0), help="linear warm-up steps (default: 2000, at most a "
        "tenth of the run)")
    add("--shuffle", action=argparse.BooleanOptionalAction, default=True, help="shuffle the "
        "training scenes each epoch (default: shuffle; the official run did not)")
    add("--grad-clip", type=C.number(float, 0, above=True), default=1.0,
        help="max gradient L2 norm (default: 1.0)")
    C.add_run_flags(p, "runs/align")
    return p.parse_args(argv)


# ============================================================================ the method


def alignment_loss(student_emb, teacher_emb, head, log_logit_scale, labels, ce_weight,
                   mse_weight=1.0):
    """The paper's objective, L = mu * MSE(s, t) + lambda * CE(exp(tau) * normalise(s) @ W, y).

    s, t: (B, D) student and teacher embeddings (unnormalised, as CLIP's image tower gives them);
    W: the frozen zero-shot head; tau = log_logit_scale, on the log scale as open_clip stores it
    (teacher.logit_scale; an exponentiated 100 is refused); labels: (B,) class ids, or (B, C) 0/1
    targets (binary cross-entropy). mu = --mse-weight, lambda = --ce-weight (the paper's
    ablation: MSE only, lambda 0; CE only, mu 0). Returns (L, MSE, CE)."""
    mse = F.mse_loss(student_emb.float(), teacher_emb.float())
    logits = C.zeroshot_logits(student_emb, head, log_logit_scale)
    if labels.ndim == 2:
        ce = F.binary_cross_entropy_with_logits(logits, labels.float())
    else:
        ce = F.cross_entropy(logits, labels)
    return mse_weight * mse + ce_weight * ce, mse, ce


def train_one_epoch(student, batches, head, logit_scale, optimizer, scheduler, step, args,
                    device):
    """One epoch of alignment from step `step` on: the student learns the teacher's embeddings
    of the same scenes through alignment_loss. batches: (the student's input bands, the
    teacher's embeddings, labels) on the device. Returns each step's (L, MSE, CE)."""
    student.train()
    losses = []
    for images, targets, labels in batches:
        with C.autocast(device):
            loss, mse, ce = alignment_loss(student(images), targets, head, logit_scale, labels,
                                           args.ce_weight, args.mse_weight)
        C.check_finite(loss, step + len(losses))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append((loss.item(), mse.item(), ce.item()))
    return losses


# ============================================================================ the batches


def alignment_batches(dataset, teacher_emb, input_size, epoch, step, total_steps, args, device):
    """The batches of one epoch as train_one_epoch takes them, up to step `total_steps`: the
    student's input, the teacher's embeddings of the same scenes, and the labels."""
    for batch in C.batch_loader(dataset, args.batch_size, train=True, shuffle=args.shuffle,
                                seed=args.seed, epoch=epoch, workers=args.workers,
                                desc=f"epoch {epoch}"):
        yield (C.ms_input(batch["images"], input_size, device, pixels=dataset.scenes.pixels),
               teacher_emb[batch["index"]].to(device, non_blocking=True),
               batch["labels"].to(device, non_blocking=True))
        step += 1
        if step == total_steps:
            return


@torch.no_grad()
def teacher_embeddings(teacher, meta, dataset, device, args):
    """The teacher's embedding of the RGB composite of every image of a split, in dataset order,
    computed once (the teacher is frozen and sees no augmentation). With --cache it is kept in a
    file keyed on the teacher's weights, the split's files and the preprocessing; never for a
    split with a skipped file, so a repaired file is embedded next time."""
    key = C.sha256_of({"teacher_sha256": meta["weights_sha256"],
                       "scenes": C.scenes_key(dataset.scenes),
                       "preprocess_cfg": teacher.visual.preprocess_cfg})
    path = os.path.join(args.cache, f"teacher-{key[:16]}.pt") if args.cache else None
    if path and os.path.isfile(path):
        return C.load_torch(path, "teacher cache", f"delete {path}")["embeddings"]
    encoders = {"teacher": C.clip_encoder(teacher, dataset.scenes.pixels, device)}
    features, _, index = C.embed(dataset, encoders, device, args.batch_size, args.workers)
    embeddings = torch.full((len(dataset), features["teacher"].shape[1]), float("nan"))
    embeddings[index] = features["teacher"]  # a skipped file's row stays NaN: never read
    if path and not dataset.skipped:
        os.makedirs(args.cache, exist_ok=True)
        C.save_torch(path, {"key": key, "embeddings": embeddings})
    return embeddings


# ============================================================================ the run


def main(argv=None):
    return C.run_stage(run, parse_args(argv))


def run(args):
    if args.redraw:
        return C.redraw(args.redraw, STAGE, {"training.png": plot_training}, args.debug)
    device = C.pick_device(args.device)
    C.check_run(args.out, STAGE, args.resume, args.overwrite)

    # ------------------------------------------------------------------ teacher
    teacher, meta, tokenizer = C.load_teacher(args.teacher, device, base=(args.model,
                                                                          args.pretrained))
    teacher.requires_grad_(False)
    logit_scale = teacher.logit_scale.detach()

    # ------------------------------------------------------------------ data, with the teacher's
    # split seed: on the scenes it was patched on, they stay out of the student's val and test
    train = C.load_split(args.data, args.root, "train", meta["split_seed"], args.download)
    if train.modality != "ms":
        raise C.UserError(f"the student reads Sentinel-2 bands, --data {args.data} is RGB; pass "
                          + " or ".join(f"--data {n}" for n in C.MS_DATASETS))
    val = C.load_split(args.data, train.root, "val", meta["split_seed"])
    # the teacher chose alpha on val: it never trained on it
    C.check_held_out(val, C.trained_scenes(meta, args.teacher), f"--teacher {args.teacher}")
    # the CE term's prompts: the teacher's on the scenes it was patched on, else the data set's
    train = C.head_prompts(train, [meta] if C.trained_on(meta, train) else [], args.prompts)
    # the frozen text head W of the CE term: the teacher's text tower on these prompts
    head = C.zeroshot_head(teacher, tokenizer, train.classnames, train.templates, device)
    train_ds = C.open_images(train, args.cache, args.workers, args.skip_bad_files)
    val_ds = C.open_images(val, args.cache, args.workers, args.skip_bad_files)
    print(f"{args.data}: {len(train_ds)} train / {len(val_ds)} val scenes of "
          f"{len(train.classes)} classes from {train.root} (split seed {meta['split_seed']}, "
          f"from the teacher)" + C.left_out_note(train))

    # ------------------------------------------------------------------ student, optimizer
    torch.manual_seed(args.seed)
    dim = teacher.visual.output_dim  # CLIP's embedding size
    student = C.Student(args.student, dim, args.input_size,
                        in_chans=len(train.pixels.student_bands), drop_path_rate=args.drop_path)
    if args.student_weights:
        load_backbone_weights(student, args.student_weights, args.student_weights_bands)
    student.to(device)
    print(f"student {args.student}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M "
          f"parameters, {student.input_size}px input, projection to {dim}-d")
    per_epoch, total_steps, warmup_steps = C.training_steps(len(train_ds), args, 2000)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.wd)
    scheduler = C.cosine_schedule(optimizer, total_steps, warmup_steps)
    identity = C.run_identity(args, train_files_sha256=C.sha256_of(train.files),
                              teacher_sha256=meta["weights_sha256"])
    states = dict(student=student, optimizer=optimizer, scheduler=scheduler)

    # the targets, before a resume restores the random state (embedding draws from torch's RNG)
    train_targets = teacher_embeddings(teacher, meta, train_ds, device, args)
    val_targets = teacher_embeddings(teacher, meta, val_ds, device, args)

    with C.run_folder(args.out, STAGE, args.resume, args.overwrite) as work:
        start_epoch, step, history = C.restart_from_checkpoint(work, identity, args.resume,
                                                               **states)
        if not args.resume:
            C.save_torch(os.path.join(work, "student_init.pt"),
                         student_record(student, args.student, meta, args.teacher, train))
        C.write_json(os.path.join(work, "args.json"), C.describe_run(args, device, STAGE))

        # -------------------------------------------------------------- training
        print(f"training {total_steps} steps ({per_epoch} per epoch, warm-up {warmup_steps})")
        for epoch in range(start_epoch, math.ceil(total_steps / max(1, per_epoch))):
            batches = alignment_batches(train_ds, train_targets, student.input_size, epoch, step,
                                        total_steps, args, device)
            losses = train_one_epoch(student, batches, head, logit_scale, optimizer, scheduler,
                                     step, args, device)
            step += len(losses)
            means = {f"train_{name}": sum(l[k] for l in losses) / max(1, len(losses))
                     for k, name in enumerate(("loss", "mse", "ce"))}
            # validation: the MSE to the teacher and the student's zero-shot score
            student.eval()
            encoder = {"student": C.student_encoder(student, val.pixels, device)}
            features, labels, index = C.embed(val_ds, encoder, device, args.batch_size,
                                              args.workers)
            metric, score = C.zeroshot_score(features["student"], labels, head, logit_scale)
            history.append({"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0],
                            **means, f"val_{metric}": score,
                            "val_mse": F.mse_loss(features["student"], val_targets[index]).item()})
            print(f"epoch {epoch}: train mse {means['train_mse']:.4f} ce {means['train_ce']:.4f} | "
                  f"val mse {history[-1]['val_mse']:.4f} zero-shot {metric} {score:.4f}")
            C.save_checkpoint(work, identity, epoch, step, history, **states)

        # -------------------------------------------------------------- save
        C.save_torch(os.path.join(work, "student.pt"),
                     student_record(student, args.student, meta, args.teacher, train))
        skipped = {**train_ds.skipped, **val_ds.skipped}
        C.write_json(os.path.join(work, "metrics.json"), {
            "epochs": history, "steps": step, "teacher": args.teacher,
            "teacher_sha256": meta["weights_sha256"], "skipped_files": skipped,
            "val": {"n_images": len(val.files), "chance": val.chance}})
    if skipped:
        print(f"skipped {len(skipped)} unreadable files (listed in metrics.json)")
    print(f"wrote {args.out}/student.pt")
    if not args.no_plots:
        C.draw_pictures(args.out, {"training.png": plot_training}, args.debug)
    return {"student": student, "teacher": teacher, "head": head, "metrics": history}


# ============================================================================ plumbing


def load_backbone_weights(student, path, bands):
    """An SSL4EO-S12-style checkpoint into the student's backbone: a state dict (or under 'model'
    / 'state_dict' / 'teacher'), prefixes ('module.', 'backbone.', ...) stripped, the patch
    embedding's bands reordered from `bands` to S2_BANDS, the position embedding resampled to the
    grid. Stops on a shape mismatch, under 90% of the tensors, or two tensors for one (MoCo: the
    base encoder loads, the one SSL4EO-S12 and MoCo v3 evaluate)."""
    ckpt = C.load_torch(path, "student weights",
                        "pass an SSL4EO-S12-style checkpoint with --student-weights")
    for key in ("model", "state_dict", "teacher"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    target = student.backbone.state_dict()
    loaded, source, unexpected = {}, {}, []
    momentum = {k for k in ckpt if "momentum_encoder." in k}  # MoCo's second encoder
    for key in ckpt:
        if key in momentum:
            continue
        name = key
        while name not in target and "." in name:  # strip 'module.', 'backbone.', ...
            name = name.split(".", 1)[1]
        if name not in target:
            unexpected.append(key)
        elif name in loaded:
            raise C.UserError(f"--student-weights {path}: both {source[name]} and {key} would load "
                              f"into {name}; pass a checkpoint with one encoder (or a plain state "
                              f"dict of it)")
        else:
            loaded[name], source[name] = ckpt[key], key
    if momentum:
        print(f"skipped the {len(momentum)} tensors of the MoCo momentum encoder; loading the "
              f"base encoder")
    proj = "patch_embed.proj.weight"
    if proj in loaded and bands == "ssl4eo" and loaded[proj].shape[1] == len(C.S2_BANDS):
        loaded[proj] = loaded[proj][:, [C.SSL4EO_BANDS.index(b) for b in C.S2_BANDS]]
    if "pos_embed" in loaded and loaded["pos_embed"].shape != target["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed
        grid = student.backbone.patch_embed.grid_size
        loaded["pos_embed"] = resample_abs_pos_embed(
            loaded["pos_embed"], list(grid), num_prefix_tokens=student.backbone.num_prefix_tokens)
        print(f"resampled the position embedding to a {grid[0]}x{grid[1]} grid")
    for name, value in loaded.items():
        if value.shape != target[name].shape:
            n = student.backbone.patch_embed.proj.in_channels
            raise C.UserError(f"--student-weights {path}: {name} has shape {tuple(value.shape)}, "
                              f"the {n}-band {type(student.backbone).__name__} needs "
                              f"{tuple(target[name].shape)}; pass a {n}-band checkpoint of this "
                              f"architecture (--student)")
    missing = [k for k in target if k not in loaded]

    def few(keys):
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "") \
            or "none"
    print(f"loaded {len(loaded)}/{len(target)} backbone tensors from {path}")
    print(f"  missing: {few(missing)}\n  unexpected: {few(unexpected)}")
    if len(loaded) < 0.9 * len(target):
        raise C.UserError(f"--student-weights {path} holds only {len(loaded)} of the "
                          f"{len(target)} tensors of the backbone; pass a checkpoint of the "
                          f"architecture named by --student")
    student.backbone.load_state_dict(loaded, strict=False)


def student_record(student, arch, meta, teacher, scenes):
    """student.pt: what stage 3 needs to rebuild a student, find its teacher and know its scenes
    and prompts; plain values and a state dict (weights_only-safe)."""
    bands = scenes.pixels.student_bands  # the 13 S2 bands, or a Sentinel-1 student's VV, VH
    normalisation = {"db_mean_std": scenes.pixels.sar} if scenes.pixels.sar else \
        {"reflectance_scale": C.REFLECTANCE_SCALE, "clip": [0.0, 1.0]}
    return {"kind": "rsclip-align/student", "arch": arch, "bands": list(bands),
            "in_chans": len(bands), "input_size": student.input_size,
            "embed_dim": student.proj.out_features, "normalisation": normalisation,
            "teacher": {"path": os.path.abspath(teacher), "model": meta["model"],
                        "weights_sha256": meta["weights_sha256"]},
            "dataset": scenes.dataset, "root": os.path.abspath(scenes.root),
            "scenes": C.scene_set(scenes.dataset, scenes.root), "split_seed": scenes.seed,
            "classes": scenes.classes, "classnames": list(scenes.classnames),
            "templates": list(scenes.templates),
            "train_scenes": C.train_ids(scenes),
            "state_dict": student.state_dict()}


def plot_training(folder):
    """training.png from metrics.json 'epochs': the MSE to the teacher (train: the epoch's mean;
    val: after the epoch), the text-head loss, and the student's zero-shot validation metric
    with its number of images and chance level."""
    m = C.read_json(os.path.join(folder, "metrics.json"))
    rows, val = m["epochs"], m.get("val") or {}
    epochs, metric = [r["epoch"] for r in rows], "map" if rows and "val_map" in rows[0] else "acc"
    figure, (mse, ce, score) = C.new_figure(9, 3, ncols=3)
    train_mse, val_mse = [r["train_mse"] for r in rows], [r["val_mse"] for r in rows]
    mse.plot(epochs, train_mse, "o-", label="train")
    mse.plot(epochs, val_mse, "s--", label="validation")
    mse.set(xlabel="epoch", ylabel="MSE to the teacher's embedding", title="alignment loss")
    mse.legend(fontsize=8)
    train_ce = [r["train_ce"] for r in rows]
    ce.plot(epochs, train_ce, "o-")
    ce.set(xlabel="epoch", title="text-head loss",
           ylabel="binary cross-entropy" if metric == "map" else "cross-entropy")
    scores = [100 * r[f"val_{metric}"] for r in rows]
    score.plot(epochs, scores, "s--", color="tab:orange",
               label=f"{val['n_images']} val images" if "n_images" in val else None)
    if val.get("chance") is not None:
        score.axhline(100 * val["chance"], color="0.5", ls=":", lw=1, label="chance")
        score.legend(fontsize=8)
    score.set(xlabel="epoch", title="zero-shot (val)",
              ylabel="mAP (%)" if metric == "map" else "top-1 accuracy (%)")
    for ax, series in ((mse, (train_mse, val_mse)), (ce, (train_ce,)), (score, (scores,))):
        C.epoch_axis(ax, epochs, *series)
    return figure


if __name__ == "__main__":
    main()
