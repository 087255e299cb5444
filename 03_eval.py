"""Stage 3: evaluate any model on any data set, zero-shot: the paper's claims are transfer claims.

    python 03_eval.py --ckpt runs/align --data eurosat_ms       # the aligned student and its teacher
    python 03_eval.py --ckpt runs/patch --data eurosat resisc45=data/NWPU-RESISC45 imagenet=data/imagenet/val
    python 03_eval.py --model ViT-B-32 --pretrained openai --data eurosat   # the un-patched baseline
    python 03_eval.py --summary                                 # the paper's table from runs/results.jsonl

A CLIP (un-patched, patched, or a student's teacher) reads RGB data sets and the RGB composites of
Sentinel-2 ones; a student reads Sentinel-2 ones. Each data set is evaluated with its own class
names and templates (--prompts overrides them). On the scenes a model was trained on ("trained on":
EuroSAT's jpgs and tifs are one set of scenes) only the split it held out is evaluated, with its
seed, and checked against its recorded training scenes; any other data set is a "transfer" (its
test split, an official one where it has one, or --split all).

Measures, for each image encoder (clip_rgb: the CLIP on RGB images or on the RGB composites of
the tifs; student_ms: the student on the 13 bands of the same tifs):
- zero-shot classification through the CLIP's text head: top-1, top-5, mean per-class recall and
  per-class accuracy (mean average precision for multi-label data), as LAION's CLIP_benchmark;
- text -> image retrieval: each class's head vector ranks the test images; mAP and precision@10;
and for a student, with its teacher CLIP:
- cross-modal retrieval of the same scenes, MS -> RGB and RGB -> MS: recall@1, 5, 10, 20, 50 (the
  official code's cut-offs);
- the modality gap: distance between the centroids of the normalised MS and RGB embeddings, and
  the mean cosine of true vs random pairs; before (student_init.pt beside student.pt, as stage 2
  saves it) and after alignment.
Every image is read once and embedded once by each encoder. Writes OUT/args.json, OUT/metrics.json
(and OUT/embeddings.pt with --save-embeddings) and appends one JSON line to --results; for a
student also OUT/modality_gap_pca.json (the gap's 2-D picture as numbers). Last, drawn from those
JSON files: confusion.png (per_class_ap.png for multi-label data) and modality_gap.png.
"""
import argparse
import datetime
import json
import math
import os

CKPT_HINT = ("pass --ckpt OUT, the run folder of 01_patch_clip.py (a patched CLIP) or of 02_align_s2.py (a "
             "student, or its student.pt), or leave out --ckpt and pass --model/--pretrained for an un-patched CLIP")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="stage 1's run folder (a patched CLIP) or stage 2's student.pt "
                   "(default: none, evaluate the un-patched --model/--pretrained)")
    p.add_argument("--model", default=None, help="open_clip model of the un-patched baseline (default: ViT-B-32)")
    p.add_argument("--pretrained", default=None, help="its open_clip tag, weights file, or 'none' (default: openai)")
    p.add_argument("--teacher", default=None, help="the student's teacher, a stage-1 run folder (default: the one it records)")
    p.add_argument("--data", nargs="+", default=None, metavar="NAME[=ROOT]",
                   help="data sets to evaluate, each NAME or NAME=ROOT, NAME one of eurosat, eurosat_ms, resisc45, "
                        "imagenet, bigearthnet19/43/5, folder (default: the checkpoint's own; eurosat for the baseline)")
    p.add_argument("--root", default=None, help="folder of a single --data NAME (default: data/<name>, or the folder "
                   "the checkpoint was trained on for its own data set; see README)")
    p.add_argument("--split", default="test", choices=("test", "val", "all"),
                   help="split to evaluate: an official one where the data set has it; 'all' takes every image, "
                        "for data sets the models were not trained on (default: test)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="split seed (default: the checkpoint's on the scenes it was trained on, else 0)")
    p.add_argument("--prompts", default=None, help="JSON file of class names and/or templates (default: the "
                   "checkpoint's prompts on its own data set, else the data set's own; README)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data loader processes (default: one per core, up to 8)")
    p.add_argument("--cache", default=None, help="folder for packed, memory-mapped splits (default: none)")
    p.add_argument("--out", default=None, help="run folder (default: <checkpoint folder>/eval-<data>-<split>; "
                   "baseline: runs/eval/<model>-<pretrained>-<data>-<split>); with several --data, the folder "
                   "holding one <data>-<split> folder each")
    p.add_argument("--results", default="runs/results.jsonl",
                   help="results log, one JSON line appended per run (default: runs/results.jsonl)")
    p.add_argument("--save-embeddings", action="store_true", help="also write OUT/embeddings.pt (embeddings, "
                   "labels, files, zero-shot head, logits)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished evaluation in --out")
    p.add_argument("--skip-bad-files", action="store_true", help="skip unreadable images, count them")
    p.add_argument("--summary", nargs="?", const="runs/results.jsonl", default=None, metavar="RESULTS",
                   help="print the table of a results log instead of evaluating: one row per model, one column "
                        "per data set, top-1 (mAP for multi-label) and the gain over the un-patched CLIP "
                        "(default log: runs/results.jsonl)")
    p.add_argument("--summary-format", default="md", choices=("md", "csv"), help="markdown or csv (default: md)")
    p.add_argument("--summary-plot", default=None, metavar="FILE", help="with --summary: also draw the table as "
                   "grouped bars into FILE, a .png (needs matplotlib) (default: none)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--no-plots", action="store_true", help="do not draw modality_gap.png and confusion.png "
                   "(per_class_ap.png) (default: draw them when matplotlib is installed)")
    args = p.parse_args(argv)
    if args.summary_plot and not args.summary:
        p.error("--summary-plot draws the table of --summary; pass --summary too")
    return args


if __name__ == "__main__":
    parse_args()  # --help and flag errors answer here, before torch and the models are imported (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common as C  # noqa: E402


# ============================================================================ metrics


def topk_accuracy(logits, labels, k):
    """Top-k accuracy (CLIP_benchmark's acc1, acc5): the fraction of images whose label is among
    their k highest logits; k is capped at the number of classes (CLIP_benchmark has no acc5 then)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def per_class_recall(pred, labels, n_classes):
    """Per-class accuracy: the fraction of each class's images predicted as that class (NaN for a
    class without images)."""
    hits = torch.bincount(labels[pred == labels], minlength=n_classes).double()
    counts = torch.bincount(labels, minlength=n_classes).double()
    return hits / counts  # 0/0 = NaN


def confusion_matrix(pred, labels, n_classes):
    """Confusion matrix (sklearn's confusion_matrix): counts[i, j] = images of class i predicted as
    class j; rows are true classes, columns predicted ones."""
    return torch.bincount(labels * n_classes + pred, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def balanced_accuracy(pred, labels, n_classes):
    """Mean per-class recall (CLIP_benchmark's mean_per_class_recall, sklearn's
    balanced_accuracy_score): per-class recall averaged over the classes that have images."""
    return per_class_recall(pred, labels, n_classes).nanmean().item()


def precision_at_k(scores, positives, k=10):
    """Precision@k: the fraction of positives among the k highest-scoring images (the top
    min(k, N) when fewer); ties at the cut are broken pessimistically (negatives ranked first)."""
    by_label = torch.argsort(positives.int(), stable=True)  # negatives first, then a stable sort by score
    order = by_label[torch.argsort(scores[by_label], descending=True, stable=True)]
    return positives[order[:k]].double().mean().item()


def true_match_ranks(queries, gallery, chunk=1024):
    """Rank (0 = first) of each query's true match, gallery row i for query row i, by cosine
    similarity: the number of gallery items scoring strictly higher than the true match plus those
    scoring equal to it (ties counted pessimistically, ranked ahead of the true match)."""
    q, g = F.normalize(queries.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    ranks = []
    for start in range(0, len(q), chunk):  # (chunk, N) similarities at a time
        sim = q[start:start + chunk] @ g.T
        true = sim.diagonal(offset=start)[:, None]
        ranks.append((sim > true).sum(dim=1) + (sim == true).sum(dim=1) - 1)
    return torch.cat(ranks)


def recall_at_k(ranks, k):
    """Recall@k of paired retrieval: the fraction of queries whose true match ranks in the top k."""
    return (ranks < k).float().mean().item()


def modality_gap(ms, rgb):
    """The modality gap (Liang et al. 2022) between paired embeddings: ||mean normalise(ms) -
    mean normalise(rgb)||_2, the mean cosine of true pairs (row i with row i) and of random pairs
    (all pairs i != j)."""
    a, b = F.normalize(ms.double(), dim=-1), F.normalize(rgb.double(), dim=-1)
    n = len(a)
    true_pairs = (a * b).sum(dim=1)
    random_pairs = (a.sum(0) @ b.sum(0) - true_pairs.sum()).item() / (n * (n - 1)) if n > 1 else math.nan
    return {"centroid_distance": (a.mean(0) - b.mean(0)).norm().item(),
            "true_pair_cosine": true_pairs.mean().item(), "random_pair_cosine": random_pairs}


def pairing_warning(gap, margin=0.05):
    """A warning when true pairs are hardly closer than random pairs (mean cosines less than
    `margin` apart): the student has then learned the teacher's mean direction, which alone shrinks
    the centroid distance, not which RGB scene each MS image is."""
    true, random = gap["true_pair_cosine"], gap["random_pair_cosine"]
    if true is None or random is None or true - random >= margin:
        return None
    return (f"true pairs (mean cosine {true:.3f}) are hardly closer than random pairs ({random:.3f}): the student "
            f"has learned the teacher's mean direction, not its scenes; do not read alignment into the smaller "
            f"modality gap (train longer, or on more data)")


# ============================================================================ evaluations


def as_targets(labels, n_classes):
    """(N, C) 0/1 targets: multi-label targets as they are, single labels one-hot."""
    return labels.bool() if labels.ndim == 2 else F.one_hot(labels, n_classes).bool()


def zeroshot_metrics(logits, labels, classes):
    """Zero-shot classification metrics of one encoder, as CLIP_benchmark reports them, and for
    single-label data the confusion matrix (its classes in order; drawn as confusion.png)."""
    if labels.ndim == 2:
        mean_ap, aps = C.mean_average_precision(logits, labels)
        return {"mean_average_precision": mean_ap, "per_class_ap": dict(zip(classes, aps.tolist()))}
    pred = logits.argmax(dim=1)
    return {"acc1": topk_accuracy(logits, labels, 1), "acc5": topk_accuracy(logits, labels, 5),
            "mean_per_class_recall": balanced_accuracy(pred, labels, len(classes)),
            "per_class": dict(zip(classes, per_class_recall(pred, labels, len(classes)).tolist())),
            "confusion_matrix": {"classes": list(classes),
                                 "counts": confusion_matrix(pred, labels, len(classes)).tolist()}}


def text_to_image(head, features, targets, classes):
    """Each class's zero-shot head vector as a query over the images: AP and precision@10 per class,
    their means over the classes with at least one image."""
    scores = F.normalize(features.float(), dim=-1) @ head
    mean_ap, aps = C.mean_average_precision(scores, targets)
    p10 = torch.tensor([precision_at_k(scores[:, c], targets[:, c], 10) if targets[:, c].any() else math.nan
                        for c in range(len(classes))])
    return {"mean_average_precision": mean_ap, "precision_at_10": p10.nanmean().item(),
            "per_class_ap": dict(zip(classes, aps.tolist()))}


RECALL_AT = (1, 5, 10, 20, 50)  # the official code's cut-offs


def cross_modal(ms, rgb):
    """Recall@k of MS -> RGB and RGB -> MS retrieval of the same scenes, k in RECALL_AT."""
    return {name: {f"recall@{k}": recall_at_k(ranks, k) for k in RECALL_AT}
            for name, ranks in (("ms_to_rgb", true_match_ranks(ms, rgb)), ("rgb_to_ms", true_match_ranks(rgb, ms)))}


# ============================================================================ checkpoints and data


def checkpoint_kind(path):
    """What --ckpt is, without loading a CLIP: ('baseline', None) when there is none, ('patched',
    its patched.json) for stage 1's run folder (or a file in it), or ('student', its record) for a
    student.pt or the stage-2 run folder holding one."""
    if path is None:
        return "baseline", None
    if not os.path.exists(path):
        raise C.UserError(f"--ckpt {path} does not exist; {CKPT_HINT}")
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isfile(os.path.join(folder, "patched.json")):
        meta = json.load(open(os.path.join(C.patched_folder(path, "--ckpt"), "patched.json")))
        if isinstance(meta, dict) and meta.get("kind") == "rsclip-align/patched-clip":
            return "patched", meta
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "student.pt")):
            inside = sorted(f for f in os.listdir(path) if f.endswith((".pt", ".json", ".safetensors")))
            raise C.UserError(f"--ckpt {path} is a folder without patched.json or student.pt (it holds "
                              f"{', '.join(inside) or 'no checkpoint files'}); {CKPT_HINT}")
        path = os.path.join(path, "student.pt")
    record = C.load_torch(path, "--ckpt", CKPT_HINT)
    if isinstance(record, dict) and record.get("kind") == "rsclip-align/student":
        return "student", record
    raise C.UserError(f"--ckpt {path} is of an unknown kind; {CKPT_HINT}")


def read_checkpoint(args):
    """The checkpoint's kind, its record (patched.json or the student's) and the patched.json of
    the CLIP it holds or was aligned to (None for the baseline); fills in the baseline's model and
    the student's teacher (--teacher or the folder in student.pt, which must hold the weights the
    student was aligned to)."""
    kind, info = checkpoint_kind(args.ckpt)
    if kind != "baseline" and (args.model or args.pretrained):
        raise C.UserError("--model/--pretrained are for the un-patched baseline; a --ckpt records its own model, "
                          "drop them")
    if kind != "student" and args.teacher:
        raise C.UserError("--teacher is for a student checkpoint; drop it or pass --ckpt OUT/student.pt")
    if kind == "baseline":
        args.model, args.pretrained = args.model or "ViT-B-32", args.pretrained or "openai"
        return kind, None, None
    if kind == "patched":
        return kind, info, info
    if os.path.isdir(args.ckpt):
        args.ckpt = os.path.join(args.ckpt, "student.pt")
    args.teacher = args.teacher or info["teacher"]["path"]
    if not os.path.exists(args.teacher):
        raise C.UserError(f"the student's teacher {args.teacher} does not exist; pass --teacher FOLDER, "
                          f"the stage-1 run folder the student was aligned to")
    teacher_meta = json.load(open(os.path.join(C.patched_folder(args.teacher), "patched.json")))
    if teacher_meta.get("weights_sha256") != info["teacher"]["weights_sha256"]:
        raise C.UserError(f"{args.teacher} is not the CLIP that {args.ckpt} was aligned to (other weights); "
                          f"pass --teacher FOLDER of that stage-1 run")
    return kind, info, teacher_meta


def trainings(args, kind, info, clip_meta):
    """What each evaluated model was trained on, the CLIP first: [{path, encoder, dataset, root,
    seed, train_scenes, record}], train_scenes a function returning the set of scene ids
    (read only when needed), record its patched.json or student record. None for the baseline."""
    out = []
    if clip_meta is not None:
        path = args.ckpt if kind == "patched" else args.teacher
        if "train_scenes" in clip_meta:
            file = os.path.join(C.patched_folder(path), clip_meta["train_scenes"])
            read = lambda: C.read_scenes(file, clip_meta["train_scenes_sha256"])  # noqa: E731
        else:
            print(f"note: {path} records no training scenes; cannot check that its held-out split is held out")
            read = set
        out.append({"path": path, "encoder": "clip_rgb", "train_scenes": read, "record": clip_meta})
    if kind == "student":
        out.append({"path": args.ckpt, "encoder": "student_ms", "record": info,
                    "train_scenes": lambda: set(info.get("train_scenes", ()))})
    for t in out:
        r = t["record"]
        t.update(dataset=r["dataset"], root=r.get("root"), seed=r["split_seed"])
    return out


def data_specs(args, records):  # records: trainings()
    """[(name, root)] from --data NAME[=ROOT] ... and --root; by default the checkpoint's own data
    set (eurosat for the baseline). A checkpoint's own data set is looked for first in the folder
    it was trained on."""
    trained_roots = {r["dataset"]: r["root"] for r in records if r and r.get("root") and os.path.isdir(r["root"])}
    names = args.data or [records[-1]["dataset"] if records else "eurosat"]
    specs = []
    for item in names:
        name, sep, root = item.partition("=")
        if name not in C.DATA:
            raise C.UserError(f"unknown --data '{name}'; choose among {', '.join(C.DATASETS)}, each as NAME or NAME=ROOT")
        if sep and not root:
            raise C.UserError(f"--data {item} names no folder after '='; write {name}=ROOT, or {name} alone")
        specs.append([name, root or None])
    if args.root:
        if len(specs) > 1 or specs[0][1]:
            raise C.UserError("--root is for a single --data NAME; give several data sets as --data NAME=ROOT ...")
        specs[0][1] = args.root
    for spec in specs:
        spec[1] = spec[1] or trained_roots.get(spec[0])
    if len({name for name, _ in specs}) < len(specs):
        raise C.UserError(f"--data names a data set twice ({' '.join(names)}); evaluate each folder in its own run")
    return [tuple(spec) for spec in specs]


def plan_split(name, root, args, kind, records):
    """The scenes to evaluate on one data set and, for each image encoder, the case: 'trained on'
    when the data set shows the scenes the model was trained on (EuroSAT's jpgs and tifs are one
    set of scenes; BigEarthNet-19/43/5 are one): only the split it held out, with its seed, is
    evaluated and checked against its training scenes; else 'transfer' (the test split, an official
    one where the data set has it; --split all takes every image)."""
    scenes = C.list_scenes(name, root)
    if kind == "student" and scenes.modality != "ms":
        raise C.UserError(f"a student reads Sentinel-2 bands, --data {name} is RGB; pass "
                          + " or ".join(f"--data {n}" for n in C.MS_DATASETS))
    own = [r for r in records if C.trained_on(r["record"], scenes)]
    seeds = {r["seed"] for r in own}
    if own and args.split == "all":
        raise C.UserError(f"--split all would evaluate {own[0]['path']} on the scenes it was trained on ({name}); "
                          f"pass --split test (its held-out split)")
    if len(seeds) > 1 and not C.DATA[name].official_splits:
        raise C.UserError(f"the student and its teacher hold out other {name} scenes (split seeds {sorted(seeds)}); "
                          f"evaluate them on another data set, or align with the teacher's seed")
    seed = min(seeds) if own else (args.split_seed if args.split_seed is not None else 0)
    if own and args.split_seed is not None and args.split_seed != seed and not C.DATA[name].official_splits:
        raise C.UserError(f"--split-seed {args.split_seed} differs from the seed {seed} that {own[0]['path']} was "
                          f"trained with: its {args.split} split would overlap the training images; drop --split-seed")
    split = C.take_split(scenes, args.split, seed)
    # one head for every encoder: the prompts the student, else its teacher, was trained with on these
    # scenes, else the data set's own (or --prompts)
    split = C.head_prompts(split, [r["record"] for r in reversed(own)], args.prompts)
    if not split.files:
        other = [s for s in ("test", "val", "all") if s != args.split and (s != "all" or not own)]
        raise C.UserError(f"the {args.split} split of {name} in {scenes.root} is empty; pass --split "
                          f"{' or '.join(other)}, or add images")
    for record in own:
        C.check_held_out(split, record["train_scenes"](), record["path"])
    case = {"clip_rgb": "transfer"}  # an un-patched CLIP was never trained here
    case.update({r["encoder"]: "trained on" if r in own else "transfer" for r in records})
    return split, case


def load_models(args, kind, info, device):
    """The CLIP (baseline, patched, or the student's teacher) with its prompts, and the student and
    the untrained student when there are: a dict."""
    if kind == "baseline":
        clip, tokenizer, _ = C.load_clip(args.model, args.pretrained, device)
        return {"clip": clip.eval(), "tokenizer": tokenizer, "meta": None, "student": None, "student_init": None}
    clip, meta, tokenizer = C.load_teacher(*((args.ckpt, device, "--ckpt") if kind == "patched" else (args.teacher, device)))
    models = {"clip": clip, "tokenizer": tokenizer, "meta": meta, "student": None, "student_init": None}
    if kind == "student":
        models["student"] = C.load_student(args.ckpt)[0].to(device)
        init_path = os.path.join(os.path.dirname(args.ckpt), "student_init.pt")
        if os.path.isfile(init_path):
            models["student_init"] = C.load_student(init_path)[0].to(device)
    return models


def default_out(args, scenes, several):
    """The run folder of one evaluation: --out (with several data sets, --out/<data>-<split>);
    else <checkpoint folder>/eval-<data>-<split>, or runs/eval/<model>-<pretrained>-<data>-<split>
    for the baseline."""
    name = f"{scenes.dataset}-{scenes.split}"
    if args.out:
        return os.path.join(args.out, name) if several else args.out
    if args.ckpt:
        folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
        return os.path.join(folder, f"eval-{name}")
    model = os.path.basename(os.path.normpath(args.model.split(":", 1)[-1]))  # a name, or a local-dir's folder
    pretrained = os.path.splitext(os.path.basename(args.pretrained))[0]  # a tag, or a weights file's name
    return os.path.join("runs", "eval", f"{model}-{pretrained}-{name}")


def embed_split(encoders, dataset, args, device, bad, split):
    """Every image of the split read once and embedded by each encoder in the same pass, so that
    row i is the same scene for all: ({name: (N, D) float32 CPU}, labels, dataset indices)."""
    loader = C.batch_loader(dataset, args.batch_size, workers=args.workers, pin_memory=device.type == "cuda")
    all_encoders = lambda raw: torch.cat([encode(raw).float() for encode in encoders.values()], dim=1)
    features, labels, index = C.embed(all_encoders, loader, lambda raw: raw, device, args.skip_bad_files, bad,
                                      desc=f"embed {split}")
    return dict(zip(encoders, features.chunk(len(encoders), dim=1))), labels, index


# ============================================================================ reporting


def print_table(title, columns, rows):
    """rows: (name, values); numbers with 4 decimals, None or NaN as '-'."""
    cell = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (
        f"{v:.4f}" if isinstance(v, float) else str(v))
    first = max(len(name) for name, _ in rows) + 2
    widths = [max(len(c), 6) + 2 for c in columns]
    print(f"\n{title}\n{'':<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for name, values in rows:
        print(f"{name:<{first}}" + "".join(f"{cell(v):>{w}}" for v, w in zip(values, widths)))


def clean(obj):
    """NaN -> None, so that metrics.json and the results log are strict JSON."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def flatten(obj, prefix=""):
    """{'a': {'b': 1}} -> {'a/b': 1}: one column per metric in the results log. Lists (a confusion
    matrix and its classes) are not metrics: they stay in metrics.json."""
    out = {}
    for k, v in obj.items():
        if isinstance(v, list):
            continue
        out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def summary_rows(lines):
    """The paper's table from results-log lines: {row: {column: (value, gain)}}, values in percent.

    A row is one model: an un-patched CLIP (its model and tag), a patched CLIP (its run folder; the
    teacher of a student's evaluation counts as one too) or a student (its checkpoint), each on the
    images it reads (clip_rgb or student_ms). A column is one evaluation setting: data set, split,
    number of images, prompts, data root and split seed (none for official splits); settings that
    differ get separate, marked columns, never one.
    The cell is top-1 accuracy for single-label data and mAP for multi-label data (the latest line
    of a row and column wins), and the gain is the difference to the un-patched CLIP of the same
    model and tag in the same column, as the paper reports its gains."""
    cells, baselines = {}, {}
    for line in lines:
        official = line["data"] in C.DATA and C.DATA[line["data"]].official_splits
        column = (line["data"], line["split"], line["n_images"], line.get("prompts_sha256"), line.get("root"),
                  None if official or line["split"] == "all" else line.get("split_seed"))
        base = (line["model"].removesuffix("-quickgelu"), line["pretrained"])
        kind = line["ckpt_kind"]
        encoders = {"baseline": [("clip_rgb", ("baseline",) + base)],
                    "patched": [("clip_rgb", ("patched", line["ckpt"]))],
                    "student": [("clip_rgb", ("patched", line["teacher"])), ("student_ms", ("student", line["ckpt"]))]}
        for encoder, row in encoders[kind]:
            value = line.get(f"zeroshot/{encoder}/acc1", line.get(f"zeroshot/{encoder}/mean_average_precision"))
            if value is not None:
                cells[row, column] = (100 * value, base)
        if kind == "baseline":
            baselines[base, column] = 100 * line["zeroshot/clip_rgb/acc1" if "zeroshot/clip_rgb/acc1" in line
                                                 else "zeroshot/clip_rgb/mean_average_precision"]
    table = {}
    for (row, column), (value, base) in cells.items():
        reference = baselines.get((base, column))
        table.setdefault(row, {})[column] = (value, None if reference is None or row[0] == "baseline"
                                             else value - reference)
    return table


def summary_layout(table):
    """The rows and columns of summary_rows() as the table shows them: (rows in order, their names,
    columns in order, their labels)."""
    def row_name(row):
        kind, rest = row[0], row[1:]
        if kind == "baseline":
            return f"CLIP {rest[0]} ({rest[1]})"
        path = os.path.relpath(rest[0]) if not os.path.relpath(rest[0]).startswith("../..") else rest[0]
        return f"patched CLIP {path}" if kind == "patched" else f"student {path}"
    columns = sorted({c for cells in table.values() for c in cells}, key=lambda c: tuple(map(str, c)))
    labels = []
    for data, split, n, prompts, root, seed in columns:
        same = [c for c in columns if c[:2] == (data, split)]
        label = f"{data} {split}"
        if len({c[5] for c in same}) > 1:
            label += f" (seed {seed})"
        if len({c[2] for c in same}) > 1:
            label += f" ({n} images)"
        if len({c[3] for c in same}) > 1:
            label += f" [prompts {(prompts or 'unknown')[:8]}]"
        if len({c[4] for c in same}) > 1:
            label += f" [{root or 'unknown root'}]"
        labels.append(label)
    order = sorted(table, key=lambda r: (["baseline", "patched", "student"].index(r[0]), row_name(r)))
    return order, [row_name(r) for r in order], columns, labels


def summary_table(table, fmt="md"):
    """Text of summary_rows(): markdown (pastes into a README) or csv."""
    order, names, columns, labels = summary_layout(table)
    cell = lambda v: "" if v is None else f"{v[0]:.2f}" + ("" if v[1] is None else f" ({v[1]:+.2f})")  # noqa: E731
    rows = [[name] + [cell(table[r].get(c)) for c in columns] for r, name in zip(order, names)]
    if fmt == "csv":
        import csv
        import io
        out = io.StringIO()
        csv.writer(out).writerows([["model", *labels], *rows])
        return out.getvalue().rstrip("\n")
    lines = ["| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary(path, fmt, plot=None):
    """--summary: the results log as the paper's table; with --summary-plot FILE also as grouped bars."""
    if plot:  # checked before anything is printed
        if not C.have_matplotlib():
            raise C.UserError(f"--summary-plot {plot} needs matplotlib; pip install matplotlib, or drop --summary-plot")
        C.check_writable(plot, "the picture", "--summary-plot FILE")
    if not os.path.isfile(path):
        raise C.UserError(f"no results log {path}; run 03_eval.py first, or pass --summary FILE")
    try:
        lines = C.read_jsonl(path)
    except ValueError as e:
        raise C.UserError(f"{path} is not a JSON-lines results log ({e}); pass the --results file of 03_eval.py")
    table = summary_rows(lines)
    if not table:
        raise C.UserError(f"{path} holds no zero-shot results; run 03_eval.py first")
    print(summary_table(table, fmt))
    if fmt == "md":
        print("\ntop-1 accuracy (mAP for multi-label data) in %; in brackets the gain over the un-patched CLIP of "
              "the same model and tag in the same column")
    if plot:
        order, names, columns, labels = summary_layout(table)
        C.plot_summary(plot, names, labels, [[table[r].get(c, (None,))[0] for c in columns] for r in order])
        if fmt == "md":  # csv goes to stdout as it is
            print(f"wrote {plot}")


# ============================================================================ main


def main(argv=None):
    args = parse_args(argv)
    with C.Session(args.debug) as session:
        if args.summary:
            return summary(args.summary, args.summary_format, args.summary_plot)
        run(args, session)


def run(args, session):
    # ------------------------------------------------------------------ checkpoint, data, models, run folders
    device = C.pick_device(args.device)
    torch.manual_seed(0)  # only a baseline with --pretrained none draws random numbers (its weights)
    kind, info, clip_meta = read_checkpoint(args)
    records = trainings(args, kind, info, clip_meta)
    specs = data_specs(args, records)
    plans = [plan_split(name, root, args, kind, records) for name, root in specs]
    outs = [default_out(args, scenes, len(plans) > 1) for scenes, _ in plans]
    datasets = [C.open_images(scenes, args.cache, args.workers) for scenes, _ in plans]
    models = load_models(args, kind, info, device)
    for out in outs:  # all bad input is refused before any run folder is made
        C.check_run_dir(out, "metrics.json", args.overwrite)
    if os.path.isdir(args.results):
        raise C.UserError(f"the results log {args.results} is a folder; pass --results FILE")
    C.check_writable(args.results, "the results log", "--results FILE")
    done = []
    for (scenes, case), dataset, out in zip(plans, datasets, outs):
        try:
            evaluate(scenes, case, dataset, out, models, args, kind, info, device, session)
        except C.UserError as e:  # e.g. an unreadable image: its unfinished run folder goes, the finished stay
            C.unmake_run_dir(out, "metrics.json")
            rest = [f"{s.dataset}={s.root}" for s, _ in plans[len(done):]]
            raise C.UserError(f"{e}" + (f" (finished before it: {', '.join(done)}; go on with --data "
                                        f"{' '.join(rest)})" if done else "")) from e
        done.append(scenes.dataset)


def evaluate(scenes, case, dataset, out, models, args, kind, info, device, session):
    """One data set: embed its images once with each encoder, compute and report the metrics,
    write OUT/metrics.json and append one line to the results log."""
    C.lock_run_dir(session, out)
    session.on_stop = f"{out} holds no metrics yet; run the same command again"
    run_args = argparse.Namespace(**{**vars(args), "data": [scenes.dataset], "root": scenes.root,
                                     "split_seed": scenes.seed, "out": out})  # as evaluated, for args.json
    run_info = C.describe_run(run_args, device)
    C.write_json(os.path.join(out, "args.json"), run_info)
    print(f"{scenes.dataset} {scenes.split} split (seed {scenes.seed}): {len(dataset)} images of "
          f"{len(scenes.classes)} classes from {scenes.root}; checkpoint: {args.ckpt or 'un-patched ' + args.model}; "
          + ", ".join(f"{encoder}: {what}" for encoder, what in case.items()) + C.left_out_note(scenes))

    # ------------------------------------------------------------------ zero-shot head and image encoders
    clip, meta = models["clip"], models["meta"]
    head = C.zeroshot_head(clip, models["tokenizer"], scenes.classnames, scenes.templates, device).cpu()
    used_prompts = {"classnames": list(scenes.classnames), "templates": list(scenes.templates)}
    logit_scale = clip.logit_scale.detach().float().cpu()
    preprocess_cfg = dict(clip.visual.preprocess_cfg)
    pixels = scenes.pixels
    encoders = {"clip_rgb": lambda raw: clip.encode_image(C.clip_input(raw, preprocess_cfg, device, pixels=pixels))}
    for name in ("student", "student_init"):
        if models[name] is not None:
            encoders[f"{name}_ms"] = lambda raw, s=models[name]: s(C.ms_input(raw, s.input_size, device, pixels=pixels))

    # ------------------------------------------------------------------ embeddings (once per encoder)
    bad = {}
    features, labels, index = embed_split(encoders, dataset, args, device, bad, scenes.split)
    targets = as_targets(labels, len(scenes.classes))
    evaluated = [name for name in features if name != "student_init_ms"]

    # ------------------------------------------------------------------ metrics
    logits = {name: C.zeroshot_logits(features[name], head, logit_scale) for name in evaluated}
    metrics = {"zeroshot": {name: zeroshot_metrics(logits[name], labels, scenes.classes) for name in evaluated},
               "text_to_image": {name: text_to_image(head, features[name], targets, scenes.classes)
                                 for name in evaluated}}
    if "student_ms" in features:
        metrics["cross_modal"] = cross_modal(features["student_ms"], features["clip_rgb"])
        metrics["modality_gap"] = {"after": modality_gap(features["student_ms"], features["clip_rgb"])}
        if "student_init_ms" in features:
            metrics["modality_gap"]["before"] = modality_gap(features["student_init_ms"], features["clip_rgb"])
    metrics = clean(metrics)
    warnings = [w for w in [pairing_warning(metrics["modality_gap"]["after"])] if w] if "modality_gap" in metrics else []

    # ------------------------------------------------------------------ report
    zs, t2i = metrics["zeroshot"], metrics["text_to_image"]
    scalars = [m for m, v in zs["clip_rgb"].items() if not isinstance(v, dict)]
    print_table(f"zero-shot classification: {scenes.dataset} {scenes.split}, {len(labels)} images", scalars,
                [(name, [zs[name][m] for m in scalars]) for name in evaluated])
    table = "per_class" if "per_class" in zs["clip_rgb"] else "per_class_ap"  # accuracy, or AP if multi-label
    print_table(f"{table.replace('_', ' ')} (zero-shot)", ["images", *evaluated],
                [(c, [n, *(zs[name][table][c] for name in evaluated)])
                 for c, n in zip(scenes.classes, targets.sum(dim=0).tolist())])
    print_table("text -> image retrieval (class prompts as queries)", ["mean_average_precision", "precision_at_10"],
                [(name, [t2i[name]["mean_average_precision"], t2i[name]["precision_at_10"]]) for name in evaluated])
    if "cross_modal" in metrics:
        print_table("cross-modal retrieval of the same scenes", [f"recall@{k}" for k in RECALL_AT],
                    [(d, list(r.values())) for d, r in metrics["cross_modal"].items()])
        gap = metrics["modality_gap"]
        print_table("modality gap (student MS vs teacher RGB)", list(gap["after"]),
                    [(when, list(gap[when].values())) for when in ("before", "after") if when in gap])
    for warning in warnings:
        print(f"warning: {warning}")
    if bad:
        print(f"skipped {len(bad)} unreadable files (listed in metrics.json)")

    # ------------------------------------------------------------------ save
    if kind == "patched":
        weights_sha256 = meta["weights_sha256"]  # checked against the file by load_teacher
    else:  # a student's file, or the baseline's weights file (None for an open_clip tag)
        weights = args.ckpt or args.pretrained
        weights_sha256 = C.sha256_of(weights) if os.path.isfile(weights) else None
    setting = {"ckpt": os.path.abspath(args.ckpt) if args.ckpt else None, "ckpt_kind": kind,
               "ckpt_sha256": weights_sha256,
               "model": meta["model"] if meta else args.model,
               "pretrained": meta["pretrained"] if meta else args.pretrained,
               "teacher": os.path.abspath(args.teacher) if args.teacher else None,
               "teacher_sha256": info["teacher"]["weights_sha256"] if kind == "student" else None,
               "data": scenes.dataset, "root": os.path.abspath(scenes.root), "split": scenes.split,
               "split_seed": scenes.seed, "n_images": len(labels), "n_classes": len(scenes.classes),
               "case": case, "prompts_sha256": C.sha256_of(used_prompts),
               "skipped_files": len(bad), "out": os.path.abspath(out)}
    C.write_json(os.path.join(out, "metrics.json"),
                 {**setting, "prompts": used_prompts, "metrics": metrics, "warnings": warnings, "skipped": bad,
                  "run": run_info})
    C.save_modality_gap_pca(out, features)  # the data of modality_gap.png (none without a student)
    if args.save_embeddings:
        C.save_torch(os.path.join(out, "embeddings.pt"), {
            "features": features, "logits": logits, "labels": labels, "index": index,
            "files": [scenes.files[i] for i in index.tolist()], "zeroshot_head": head, "logit_scale": logit_scale})
    elif os.path.exists(os.path.join(out, "embeddings.pt")):  # an earlier run's (--overwrite): not these metrics'
        os.remove(os.path.join(out, "embeddings.pt"))
    time = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    C.append_jsonl(args.results, {"time": time, **{k: v for k, v in setting.items() if k != "case"},
                                  **flatten({"case": case}), **flatten(metrics)})
    print(f"\nwrote {out}/metrics.json; appended to {args.results}")
    C.draw_pictures(out, session, draw=not args.no_plots)  # from metrics.json, modality_gap_pca.json
    print()  # a blank line before the next data set


if __name__ == "__main__":
    main()
