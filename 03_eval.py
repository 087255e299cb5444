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

Measures, for each image encoder (clip_rgb: the CLIP on RGB images or the RGB composites of the
tifs; student_ms: the student on the 13 bands of the same tifs):
- zero-shot classification through the CLIP's text head: top-1, top-5, mean per-class recall and
  per-class accuracy (mean average precision for multi-label data), as LAION's CLIP_benchmark;
- text -> image retrieval: each class's head vector ranks the test images; mAP and precision@10;
- with --linear-probe, a logistic-regression probe on the frozen embeddings (the CLIP paper's
  protocol: fitted on the train split, C chosen on val): its test top-1 (mAP for multi-label data);
and for a student, with its teacher CLIP:
- cross-modal retrieval of the same scenes, MS -> RGB and RGB -> MS: recall@1, 5, 10, 20, 50;
- the modality gap: distance between the centroids of the normalised MS and RGB embeddings, and
  the mean cosine of true vs random pairs; before (student_init.pt beside student.pt) and after.
Every image is read once and embedded once by each encoder. Writes OUT/args.json, metrics.json
(embeddings.pt with --save-embeddings; modality_gap_pca.json for a student), confusion.png
(per_class_ap.png for multi-label data) and modality_gap.png, and appends a line to --results.
"""
import argparse
import datetime
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import common as C

STAGE = "03_eval.py"
CKPT_HINT = ("pass --ckpt OUT, the run folder of 01_patch_clip.py (a patched CLIP) or of 02_align_s2.py (a "
             "student, or its student.pt), or leave out --ckpt and pass --model/--pretrained for an un-patched CLIP")
RECALL_AT = (1, 5, 10, 20, 50)  # the official code's cut-offs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", help="stage 1's run folder (a patched CLIP), stage 2's run folder or student.pt (a student) "
        "(default: none, the un-patched --model/--pretrained)")
    add("--model", help="open_clip model of the un-patched baseline (default: ViT-B-32)")
    add("--pretrained", help="its open_clip tag, weights file, or 'none' (default: openai)")
    add("--name", help="the un-patched model's name in --summary, e.g. RemoteCLIP for its weights file (default: "
        "CLIP and the tag, or the weights file's name)")
    add("--teacher", help="the student's teacher, a stage-1 run folder (default: the one it records)")
    add("--data", nargs="+", metavar="NAME[=ROOT]", help="data sets to evaluate, NAME one of the README's data "
        "table (default: the checkpoint's own; eurosat for the baseline)")
    add("--root", help="folder of a single --data NAME (default: data/<name>, or the checkpoint's own folder)")
    add("--split", default="test", choices=("test", "val", "all"), help="split to evaluate, official where the data "
        "set has one; 'all' for data sets the models were not trained on (default: test)")
    add("--split-seed", type=int, help="split seed (default: the checkpoint's on the scenes it was trained on, else 0)")
    add("--prompts", help="JSON file of class names and/or templates (default: the checkpoint's on its own data set, "
        "else the data set's own; docs/evaluation.md)")
    add("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes (default: cores, up to 8)")
    add("--cache", help="folder for packed, memory-mapped splits (default: none)")
    add("--out", help="run folder (default: <checkpoint folder>-eval-<data>-<split>-<root hash>, baseline: runs/eval/"
        "<model>-<pretrained>-<data>-<split>-<root hash>); with several --data, the folder of one <data>-<split> each")
    add("--results", default="runs/results.jsonl", help="results log, a JSON line per evaluation (default: %(default)s)")
    add("--save-embeddings", action="store_true", help="also write OUT/embeddings.pt (embeddings, labels, files, head; "
        "with --linear-probe the train and val embeddings too)")
    add("--linear-probe", action="store_true", help="also fit a logistic-regression probe per encoder on the frozen "
        "embeddings of the train split (same seed), C chosen on the val split, scored on the test split; on a data set "
        "a model was trained on, its train split is that model's training data (docs/evaluation.md)")
    add("--overwrite", action="store_true", help="replace a finished evaluation in --out")
    add("--skip-bad-files", action="store_true", help="skip unreadable images, count them")
    add("--summary", nargs="?", const="runs/results.jsonl", metavar="RESULTS", help="only print the paper's table "
        "of a results log: a row per model, a column per data set, top-1 (mAP) and the gain over the un-patched CLIP")
    add("--summary-format", default="md", choices=("md", "csv"), help="markdown or csv (default: md)")
    add("--summary-plot", metavar="FILE", help="with --summary: also draw it as grouped bars into FILE.png")
    add("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add("--no-plots", action="store_true", help="draw no pictures (default: draw them when matplotlib is installed)")
    add("--redraw", metavar="OUT", help="only draw the pictures of a finished evaluation again")
    args = p.parse_args(argv)
    if args.summary_plot and not args.summary:
        p.error("--summary-plot draws the table of --summary; pass --summary too")
    if args.linear_probe and args.split != "test":
        p.error(f"--linear-probe trains on the train split and picks C on the val split; it scores the test split, "
                f"drop --split {args.split}")
    return args


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
    return hits / torch.bincount(labels, minlength=n_classes).double()  # 0/0 = NaN


def confusion_matrix(pred, labels, n_classes):
    """Confusion matrix (sklearn's): counts[i, j] = images of class i predicted as class j."""
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
    """A warning when true pairs are hardly closer than random pairs (mean cosines less than `margin`
    apart): the student has learned the teacher's mean direction, which alone shrinks the centroid
    distance, not which RGB scene each MS image is."""
    true, random = gap["true_pair_cosine"], gap["random_pair_cosine"]
    if true is None or random is None or true - random >= margin:
        return None
    return (f"true pairs (mean cosine {true:.3f}) are hardly closer than random pairs ({random:.3f}): the student "
            f"has learned the teacher's mean direction, not its scenes; do not read alignment into the smaller "
            f"modality gap (train longer, or on more data)")


def small_split_caveats(n, cross_modal):
    """What a split of n images cannot measure, said where the figures are printed: a recall@k with
    k >= n is 1 for any model, precision@10 of fewer than 10 images ranks them all, one image has
    every average precision 1."""
    ks = [k for k in RECALL_AT if k >= n] if cross_modal else []
    return [f"{n} test images: " + "; ".join(
        ([f"recall@{', '.join(map(str, ks))} is 1 for any model"] if ks else [])
        + (["precision@10 ranks all of them"] if n < 10 else []) + (["every average precision is 1"] if n == 1 else [])
        + ["read these as a check, not a measurement"])] if ks or n < 10 else []


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


def cross_modal(ms, rgb):
    """Recall@k of MS -> RGB and RGB -> MS retrieval of the same scenes, k in RECALL_AT."""
    return {name: {f"recall@{k}": recall_at_k(ranks, k) for k in RECALL_AT}
            for name, ranks in (("ms_to_rgb", true_match_ranks(ms, rgb)), ("rgb_to_ms", true_match_ranks(rgb, ms)))}


# ============================================================================ linear probe (--linear-probe)


PROBE_CS = tuple(10.0 ** k for k in range(-6, 7))  # the CLIP paper's range of C = 1/lambda, a decade apart


def fit_logistic(x, y, c, n_classes, max_iter=1000):
    """L2-regularised logistic regression, sklearn's LogisticRegression(C=c) with lbfgs: minimises
    mean_i loss_i + ||W||^2 / (2 c N) over W (D, K) and an unpenalised bias b (K), which is sklearn's
    c * sum_i loss_i + ||W||^2 / 2 divided by c N. For class ids y (N,), loss_i is the cross-entropy
    of softmax(x_i W + b) (multinomial); for 0/1 targets y (N, K), the sum over the K classes of the
    binary cross-entropy of sigmoid(x_i W + b): K independent binary probes fitted side by side (for
    K = 2 class ids sklearn fits one binary probe instead, the same predictions at its C = 2c).
    torch's L-BFGS (strong-Wolfe line search, history 10 as scipy's) from zero, float64 on the CPU,
    until the largest |gradient| is at most 1e-7 (sklearn's default tol: 1e-4) or a step changes the
    objective or the weights by less than 1e-12, at most max_iter iterations (the CLIP paper's 1,000)
    and 1.25 max_iter evaluations; returns (W, b, converged): converged False when a budget stopped it
    (as sklearn's ConvergenceWarning; on separable data a large c puts the optimum near infinity)."""
    x = x.double()
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    data_loss = (lambda z: F.binary_cross_entropy_with_logits(z, y.double(), reduction="sum") / len(x)) \
        if y.ndim == 2 else (lambda z: F.cross_entropy(z, y.long()))
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                                  history_size=10, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = data_loss(x @ w + b) + (w * w).sum() / (2 * c * len(x))
        loss.backward()
        return loss
    optimizer.step(objective)
    state = optimizer.state[w]
    return w.detach(), b.detach(), state["n_iter"] < max_iter and state["func_evals"] < max_iter * 5 // 4


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, cs=PROBE_CS):
    """A linear probe on frozen embeddings, the CLIP paper's protocol (its appendix A.3: L-BFGS
    logistic regression, C swept on a validation split): features L2-normalised (as CLIP_benchmark's
    linear probe, normalize=True by default), fit_logistic on the train split for each C in cs (the
    paper's 1e-6..1e6, a decade apart instead of its binary search to 8 steps a decade), the C with
    the best val score kept (the smaller C on ties), and that probe scored on the test split: top-1
    accuracy, or for 0/1 targets (N, K) the mean average precision of its K binary probes
    (common.mean_average_precision). Unlike the paper (and CLIP_benchmark), the probe is not refitted
    on train + val: the val images only choose C. Returns {'acc1' or 'mean_average_precision': test
    score, 'C', 'val_score', 'converged' (the fit at that C), 'val_scores': [[C, val score], ...],
    'n_train', 'n_val'}."""
    train_x, val_x, test_x = (F.normalize(x.double(), dim=-1) for x in (train_x, val_x, test_x))
    multilabel = train_y.ndim == 2
    n_classes = train_y.shape[1] if multilabel else 1 + max(int(y.max()) for y in (train_y, val_y, test_y))
    metric = "mean_average_precision" if multilabel else "acc1"

    def score(x, y, fit):
        logits = x @ fit[0] + fit[1]
        return C.mean_average_precision(logits, y)[0] if multilabel else topk_accuracy(logits, y, 1)
    fits = [fit_logistic(train_x, train_y, c, n_classes) for c in cs]
    val_scores = [score(val_x, val_y, fit) for fit in fits]
    best = int(torch.tensor(val_scores).nan_to_num(-1.0).argmax())  # the first maximum: the smaller C on ties
    return {metric: score(test_x, test_y, fits[best]), "C": cs[best], "val_score": val_scores[best],
            "converged": fits[best][2], "val_scores": [[c, s] for c, s in zip(cs, val_scores)],
            "n_train": len(train_x), "n_val": len(val_x)}


# ============================================================================ checkpoints and data


def read_checkpoint(args):
    """What --ckpt is, before a model is loaded: (kind, the student's record, the CLIP's patched.json).
    A file is evaluated as what it is: student.pt a student, a file of a patched CLIP (patched.json,
    its config or weights) that CLIP, stage 1's finetuned.pt the fine-tuned image tower (alpha 1, for
    PAINT's comparison); a folder by the patched.json or student.pt it holds. Fills in the baseline's
    model and the student's teacher."""
    teacher_error = C.UserError("--teacher is for a student checkpoint; drop it or pass --ckpt OUT/student.pt")
    if args.ckpt is None:
        if args.teacher:
            raise teacher_error
        args.model, args.pretrained = args.model or "ViT-B-32", args.pretrained or "openai"
        return "baseline", None, None
    if args.model or args.pretrained or args.name:
        raise C.UserError("--model/--pretrained/--name are for the un-patched baseline; a --ckpt records its own model, "
                          "drop them")
    if not os.path.exists(args.ckpt):
        raise C.UserError(f"--ckpt {args.ckpt} does not exist; {CKPT_HINT}")
    folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt) or "."
    name = os.path.basename(args.ckpt)
    if os.path.isfile(os.path.join(folder, "patched.json")) and (
            folder == args.ckpt or name in ("patched.json", C.OPEN_CLIP_CONFIG, C.OPEN_CLIP_WEIGHTS, "finetuned.pt")):
        if args.teacher:
            raise teacher_error
        return "finetuned" if name == "finetuned.pt" else "patched", None, C.read_json(os.path.join(folder, "patched.json"))
    if os.path.isdir(args.ckpt):
        if not os.path.isfile(os.path.join(args.ckpt, "student.pt")):
            inside = sorted(f for f in os.listdir(args.ckpt) if f.endswith((".pt", ".json", ".safetensors")))
            raise C.UserError(f"--ckpt {args.ckpt} is a folder without patched.json or student.pt (it holds "
                              f"{', '.join(inside) or 'no checkpoint files'}); {CKPT_HINT}")
        args.ckpt = os.path.join(args.ckpt, "student.pt")
    record = C.load_torch(args.ckpt, "--ckpt", CKPT_HINT) if args.ckpt.endswith(".pt") else None
    if not isinstance(record, dict) or record.get("kind") != "rsclip-align/student":
        raise C.UserError(f"--ckpt {args.ckpt} is of an unknown kind; {CKPT_HINT}")
    args.teacher = args.teacher or record["teacher"]["path"]
    if not os.path.exists(args.teacher):
        raise C.UserError(f"the student's teacher {args.teacher} does not exist; pass --teacher FOLDER, the stage-1 "
                          f"run folder the student was aligned to")
    teacher_meta = C.read_json(os.path.join(C.patched_folder(args.teacher), "patched.json"))
    if teacher_meta.get("weights_sha256") != record["teacher"]["weights_sha256"]:
        raise C.UserError(f"{args.teacher} is not the CLIP that {args.ckpt} was aligned to (other weights); "
                          f"pass --teacher FOLDER of that stage-1 run")
    return "student", record, teacher_meta


def trainings(args, kind, record, clip_meta):
    """What each evaluated model was trained on, the CLIP first: [{path, encoder, record, seed,
    train_scenes}], train_scenes a function returning its set of scene ids (read only when needed)."""
    out = []
    if clip_meta is not None:
        path = args.teacher if kind == "student" else args.ckpt
        file = os.path.join(C.patched_folder(path), clip_meta["train_scenes"])
        out.append({"path": path, "encoder": "clip_rgb", "record": clip_meta, "seed": clip_meta["split_seed"],
                    "train_scenes": lambda: C.read_scenes(file, clip_meta["train_scenes_sha256"])})
    if kind == "student":
        out.append({"path": args.ckpt, "encoder": "student_ms", "record": record, "seed": record["split_seed"],
                    "train_scenes": lambda: set(record.get("train_scenes", ()))})
    return out


def data_specs(args, records):
    """[(name, root)] from --data NAME[=ROOT] ... and --root; by default the checkpoint's own data set
    (eurosat for the baseline), looked for first in the folder it was trained on."""
    trained_roots = {r["record"]["dataset"]: r["record"].get("root") for r in records
                     if r["record"].get("root") and os.path.isdir(r["record"]["root"])}
    names = args.data or [records[-1]["record"]["dataset"] if records else "eurosat"]
    specs = []
    for item in names:
        name, sep, root = item.partition("=")
        if name not in C.DATA:
            raise C.UserError(f"unknown --data '{name}'; choose among {', '.join(C.DATA)}, each as NAME or NAME=ROOT")
        if sep and not root:
            raise C.UserError(f"--data {item} names no folder after '='; write {name}=ROOT, or {name} alone")
        specs.append([name, root or None])
    if args.root:
        if len(specs) > 1 or specs[0][1]:
            raise C.UserError("--root is for a single --data NAME; give several data sets as --data NAME=ROOT ...")
        specs[0][1] = args.root
    if len({name for name, _ in specs}) < len(specs):
        raise C.UserError(f"--data names a data set twice ({' '.join(names)}); evaluate each folder in its own run")
    return [(name, root or trained_roots.get(name)) for name, root in specs]


def plan_split(name, root, args, kind, records):
    """The scenes to evaluate on one data set and, for each image encoder, the case: 'trained on'
    when the data set shows the scenes the model was trained on (trained_on; or a folder of the same
    classes holding scene ids it was trained on: a copy of its data): only the split it held out, with
    its seed, is evaluated and checked against its training scenes; else 'transfer' (the test split,
    an official one where the data set has it; --split all takes every image). Returns (split, case,
    probe): probe, with --linear-probe, the train and val splits of the same seed ({'train', 'val'})."""
    scenes = C.list_scenes(name, root)
    bands = tuple(records[-1]["record"].get("bands", C.S2_BANDS)) if kind == "student" else None
    if kind == "student" and (scenes.modality != "ms" or scenes.pixels.student_bands != bands):
        raise C.UserError(f"the student reads {'/'.join(bands[:2])}{'/...' if len(bands) > 2 else ''}, --data {name} "
                          f"does not hold them; pass " + " or ".join(f"--data {n}" for n in C.MS_DATASETS
                                                                    if C.DATA[n].pixels.student_bands == bands))
    ids, copied = {C.scene_id(f) for f in scenes.files}, {}
    for r in records:  # another folder of the same classes holding its training scenes' ids: a copy of its data
        if not C.trained_on(r["record"], scenes) and list(r["record"]["classes"]) == list(scenes.classes):
            copied[r["path"]] = len(ids & r["train_scenes"]())
    own = [r for r in records if C.trained_on(r["record"], scenes) or copied.get(r["path"])]
    seeds, official = {r["seed"] for r in own}, C.DATA[name].official_splits
    if own and args.split == "all":
        raise C.UserError(f"--split all would evaluate {own[0]['path']} on the scenes it was trained on ({name}); "
                          f"pass --split test (its held-out split)")
    if len(seeds) > 1 and not official:
        raise C.UserError(f"the student and its teacher hold out other {name} scenes (split seeds {sorted(seeds)}); "
                          f"evaluate them on another data set, or align with the teacher's seed")
    seed = min(seeds) if own else (args.split_seed if args.split_seed is not None else 0)
    if own and args.split_seed is not None and args.split_seed != seed and not official:
        raise C.UserError(f"--split-seed {args.split_seed} differs from the seed {seed} that {own[0]['path']} was "
                          f"trained with: its {args.split} split would overlap the training images; drop --split-seed")
    # one head for every encoder: the prompts the student, else its teacher, was trained with here, else the data set's
    split = C.head_prompts(C.take_split(scenes, args.split, seed), [r["record"] for r in reversed(own)], args.prompts)
    if not split.files:
        other = [s for s in ("test", "val", "all") if s != args.split and (s != "all" or not own)]
        raise C.UserError(f"the {args.split} split of {name} in {scenes.root} is empty; pass --split "
                          f"{' or '.join(other)}, or add images")
    for record in own:
        C.check_held_out(split, record["train_scenes"](), record["path"])
    probe = {s: C.take_split(scenes, s, seed) for s in ("train", "val")} if args.linear_probe else None
    for s, part in (probe or {}).items():
        if not part.files:
            raise C.UserError(f"--linear-probe trains on the train split of {name} and picks C on its val split; "
                              f"the {s} split in {scenes.root} (seed {seed}) is empty: add images, or drop --linear-probe")
    case = {"clip_rgb": "transfer", **{r["encoder"]: "transfer" if r not in own else f"trained on ({copied[r['path']]} "
                                       f"of its {len(ids)} scenes have the ids of its training scenes: a copy of its "
                                       f"training data)" if copied.get(r["path"]) else "trained on" for r in records}}
    return split, case, probe


def load_models(args, kind, device):
    """The CLIP (baseline, patched, or the student's teacher) with its tokenizer and patched.json, and
    the student and the untrained student (student_init.pt beside it) where there are."""
    if kind == "baseline":
        clip, tokenizer, _ = C.load_clip(args.model, args.pretrained, device)
        return {"clip": clip.eval(), "tokenizer": tokenizer, "meta": None}
    clip, meta, tokenizer = C.load_teacher(args.teacher if kind == "student" else args.ckpt, device,
                                           "--teacher" if kind == "student" else "--ckpt")
    if kind == "finetuned":  # the patched CLIP's model with the fine-tuned image tower
        clip.visual.load_state_dict(C.load_torch(args.ckpt, "--ckpt", "re-run 01_patch_clip.py"))
    models = {"clip": clip, "tokenizer": tokenizer, "meta": meta}
    for name, path in (("student", args.ckpt), ("student_init", os.path.join(os.path.dirname(args.ckpt), "student_init.pt"))):
        if kind == "student" and os.path.isfile(path):
            models[name] = load_student(path).to(device)
    return models


def load_student(path):
    """A student that stage 2 saved (its student_record), rebuilt, in eval mode."""
    record = C.load_torch(path, "student checkpoint", "pass a student.pt written by 02_align_s2.py")
    try:
        student = C.Student(record["arch"], record["embed_dim"], record["input_size"], record["in_chans"])
        student.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise C.UserError(f"{path} does not rebuild its student ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                          f"pass a student.pt written by this version of 02_align_s2.py")
    return student.eval()


def default_out(args, kind, scenes, several):
    """The run folder of one evaluation: --out (with several data sets, --out/<data>-<split>); else
    <checkpoint folder>-eval-<data>-<split>-<root> (beside it: an --overwrite of that run, which
    replaces its folder, keeps it; -finetuned-eval- for its finetuned.pt), or runs/eval/<model>-
    <pretrained>-<data>-<split>-<root>; <root>: 8 hex digits of the data folder's path, so that
    another folder of the data set is another evaluation."""
    name = f"{scenes.dataset}-{scenes.split}"
    if args.out:
        return os.path.join(args.out, name) if several else args.out
    name += "-" + C.sha256_of(os.path.realpath(scenes.root))[:8]
    if args.ckpt:
        folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
        return f"{os.path.normpath(folder)}-{'finetuned-' if kind == 'finetuned' else ''}eval-{name}"
    model = os.path.basename(os.path.normpath(args.model.split(":", 1)[-1]))  # a name, or a local-dir's folder
    pretrained = os.path.splitext(os.path.basename(args.pretrained))[0]  # a tag, or a weights file's name
    return os.path.join("runs", "eval", f"{model}-{pretrained}-{name}")


# ============================================================================ one evaluation


def evaluate(scenes, case, dataset, work, models, args, kind, device, probe=None):
    """One data set: embed its images once with each encoder, compute, print and write the metrics
    into work/ (metrics.json); returns the line for the results log. probe: the train and val
    datasets of --linear-probe ({'train', 'val'}), embedded once by each evaluated encoder."""
    run_args = argparse.Namespace(**{**vars(args), "data": [scenes.dataset], "root": scenes.root,
                                     "split_seed": scenes.seed, "out": work.removesuffix(".partial")})
    run_info = C.describe_run(run_args, device, STAGE)
    C.write_json(os.path.join(work, "args.json"), run_info)
    print(f"{scenes.dataset} {scenes.split} split (seed {scenes.seed}): {len(dataset)} images of "
          f"{len(scenes.classes)} classes from {scenes.root}; checkpoint: {args.ckpt or 'un-patched ' + args.model}; "
          + ", ".join(f"{encoder}: {what}" for encoder, what in case.items()) + C.left_out_note(scenes))

    # ------------------------------------------------------------------ zero-shot head; embeddings (once per encoder)
    clip, meta = models["clip"], models["meta"]
    head = C.zeroshot_head(clip, models["tokenizer"], scenes.classnames, scenes.templates, device).cpu()
    used_prompts = {"classnames": list(scenes.classnames), "templates": list(scenes.templates)}
    logit_scale = clip.logit_scale.detach().float().cpu()
    encoders = {"clip_rgb": C.clip_encoder(clip, scenes.pixels, device)}
    encoders.update({f"{name}_ms": C.student_encoder(models[name], scenes.pixels, device)
                     for name in ("student", "student_init") if name in models})
    features, labels, index = C.embed(dataset, encoders, device, args.batch_size, args.workers)
    targets = labels.bool() if labels.ndim == 2 else F.one_hot(labels, len(scenes.classes)).bool()
    evaluated = [name for name in features if name != "student_init_ms"]

    # ------------------------------------------------------------------ metrics
    logits = {name: C.zeroshot_logits(features[name], head, logit_scale) for name in evaluated}
    metrics = {"zeroshot": {name: zeroshot_metrics(logits[name], labels, scenes.classes) for name in evaluated},
               "text_to_image": {name: text_to_image(head, features[name], targets, scenes.classes)
                                 for name in evaluated}}
    if "student_ms" in features:
        metrics["cross_modal"] = cross_modal(features["student_ms"], features["clip_rgb"])
        metrics["modality_gap"] = {when: modality_gap(features[name], features["clip_rgb"])
                                   for when, name in (("after", "student_ms"), ("before", "student_init_ms"))
                                   if name in features}
    if probe:  # fitted on train, C chosen on val, scored on the test split's embeddings above
        fit = {s: C.embed(data, {n: encoders[n] for n in evaluated}, device, args.batch_size, args.workers)
               for s, data in probe.items()}
        metrics["linear_probe"] = {n: linear_probe(fit["train"][0][n], fit["train"][1], fit["val"][0][n], fit["val"][1],
                                                   features[n], labels) for n in evaluated}
    metrics = clean(metrics)
    warnings = [w for w in [pairing_warning(metrics["modality_gap"]["after"])] if w] if "modality_gap" in metrics else []
    warnings += small_split_caveats(len(labels), "cross_modal" in metrics)
    warnings += [f"the linear probe of {n} at the chosen C={lp['C']:g} stopped at L-BFGS's budget before converging "
                 f"(separable train embeddings: more dimensions than images?); its score depends on where it stopped"
                 for n, lp in metrics.get("linear_probe", {}).items() if not lp["converged"]]

    # ------------------------------------------------------------------ report
    zs, t2i = metrics["zeroshot"], metrics["text_to_image"]
    scalars = [m for m, v in zs["clip_rgb"].items() if not isinstance(v, dict)]
    print_table(f"zero-shot classification: {scenes.dataset} {scenes.split}, {len(labels)} images", scalars,
                [(name, [zs[name][m] for m in scalars]) for name in evaluated])
    table = "per_class" if "per_class" in zs["clip_rgb"] else "per_class_ap"  # accuracy, or AP if multi-label
    print_table(f"{table.replace('_', ' ')} (zero-shot)", ["images", *evaluated],
                [(c, [n, *(zs[name][table][c] for name in evaluated)])
                 for c, n in zip(scenes.classes, targets.sum(dim=0).tolist())])
    t2i_columns = ["precision_at_10"] if labels.ndim == 2 else ["mean_average_precision", "precision_at_10"]
    print_table("text -> image retrieval (class prompts as queries)" + ("; its mAP is the zero-shot mAP above: "
                "per class, the same scores rank the same images" if labels.ndim == 2 else ""), t2i_columns,
                [(name, [t2i[name][m] for m in t2i_columns]) for name in evaluated])
    if "linear_probe" in metrics:
        lp = metrics["linear_probe"]
        score = "acc1" if "acc1" in lp["clip_rgb"] else "mean_average_precision"
        print_table(f"linear probe: logistic regression on {lp['clip_rgb']['n_train']} train images, C chosen on "
                    f"{lp['clip_rgb']['n_val']} val images", [score, "C", "val_score"],
                    [(n, [lp[n][score], f"{lp[n]['C']:g}", lp[n]["val_score"]]) for n in evaluated])
    if "cross_modal" in metrics:
        print_table("cross-modal retrieval of the same scenes", [f"recall@{k}" for k in RECALL_AT],
                    [(d, list(r.values())) for d, r in metrics["cross_modal"].items()])
        gap = metrics["modality_gap"]
        print_table("modality gap (student MS vs teacher RGB)", list(gap["after"]),
                    [(when, list(gap[when].values())) for when in ("before", "after") if when in gap])
    for warning in warnings:
        print(f"warning: {warning}")
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} unreadable files (listed in metrics.json)")

    # ------------------------------------------------------------------ save
    weights = args.ckpt or args.pretrained  # a student's file, or the baseline's weights file (none for a tag)
    weights_sha256 = C.sha256_of(weights) if os.path.isfile(weights) else None
    name = args.name or (os.path.splitext(os.path.basename(weights))[0] if kind == "baseline" and weights_sha256 else None)
    ckpt = C.patched_folder(args.ckpt, "--ckpt") if kind == "patched" else args.ckpt  # a patched CLIP: its folder
    setting = {"ckpt": os.path.abspath(ckpt) if ckpt else None, "ckpt_kind": kind,
               "ckpt_sha256": meta["weights_sha256"] if kind == "patched" else weights_sha256,
               "model": meta["model"] if meta else args.model, "pretrained": meta["pretrained"] if meta else args.pretrained,
               "name": f"{name} ({args.model})" if name else None,
               "teacher": os.path.abspath(args.teacher) if args.teacher else None,
               "teacher_sha256": meta["weights_sha256"] if kind == "student" else None,
               "data": scenes.dataset, "root": os.path.abspath(scenes.root), "split": scenes.split,
               "split_seed": scenes.seed, "n_images": len(labels), "n_classes": len(scenes.classes),
               "classes": list(scenes.classes),
               "case": case, "prompts_sha256": C.sha256_of(used_prompts),
               "skipped_files": len(dataset.skipped), "out": os.path.abspath(run_args.out)}
    C.write_json(os.path.join(work, "metrics.json"), {**setting, "prompts": used_prompts, "metrics": metrics,
                                                      "warnings": warnings, "skipped": dataset.skipped, "run": run_info})
    if "student_ms" in features:  # the data of modality_gap.png
        C.write_json(os.path.join(work, "modality_gap_pca.json"), modality_gap_pca(features), indent=None)
    if args.save_embeddings:
        C.save_torch(os.path.join(work, "embeddings.pt"), {
            "features": features, "logits": logits, "labels": labels, "index": index,
            "files": [scenes.files[i] for i in index.tolist()], "zeroshot_head": head, "logit_scale": logit_scale,
            **({"probe": {s: {"features": f, "labels": y} for s, (f, y, _) in fit.items()}} if probe else {})})
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **{k: v for k, v in setting.items() if k not in ("case", "classes")}, **flatten({"case": case}), **flatten(metrics)}


def print_table(title, columns, rows):
    """rows: (name, values); numbers with 4 decimals, None or NaN as '-'."""
    first, widths = max(len(name) for name, _ in rows) + 2, [max(len(c), 6) + 2 for c in columns]
    print(f"\n{title}\n{'':<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for name, values in rows:
        print(f"{name:<{first}}" + "".join(f"{'-' if v is None or v != v else f'{v:.4f}' if isinstance(v, float) else v:>{w}}"
                                            for v, w in zip(values, widths)))


def clean(obj):
    """NaN -> None, so that metrics.json and the results log are strict JSON."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):  # e.g. the linear probe's val scores
        return [clean(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def flatten(obj, prefix=""):
    """{'a': {'b': 1}} -> {'a/b': 1}: one column per metric in the results log (lists stay in metrics.json)."""
    out = {}
    for k, v in obj.items():
        if not isinstance(v, list):
            out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# ============================================================================ the paper's table (--summary)


def summary_rows(lines):
    """The paper's table from results-log lines: ({row: {column: (value, gain)}}, {row: name}), values
    in percent. A row is one set of weights (by hash, named by the latest line's path): an un-patched
    CLIP (model and tag, or a weights file by --name such as RemoteCLIP), a patched CLIP (a student's
    teacher counts as one), a fine-tuned image tower (finetuned.pt) or a student, on the images it
    reads. A column is one evaluation setting: data set, split, number of images, prompts, root and
    split seed (none for official splits); settings that differ get separate columns. A cell is top-1
    (mAP for multi-label data; the latest line wins) and its gain over the un-patched CLIP of the same
    model and tag in the same column, as the paper reports its gains. Lines of --linear-probe runs add
    columns of their own, '<data> <split> linear probe' (the same key without prompts, which a probe
    does not read, and with 'linear probe' last), after the zero-shot ones: the probe's test top-1 (mAP)."""
    cells, baselines, names = {}, {}, {}
    for line in lines:
        official = line["data"] in C.DATA and C.DATA[line["data"]].official_splits
        column = (line["data"], line["split"], line["n_images"], line.get("prompts_sha256"), line.get("root"),
                  None if official or line["split"] == "all" else line.get("split_seed"))
        base = (line["model"].removesuffix("-quickgelu"), line["pretrained"])
        ckpt, teacher = (line.get("ckpt_sha256") or line["ckpt"]), (line.get("teacher_sha256") or line["teacher"])
        named = lambda what, p: f"{what} {p if os.path.relpath(p).startswith('../..') else os.path.relpath(p)}"  # noqa
        probe_column = (*column[:3], None, *column[4:], "linear probe")
        kind = line["ckpt_kind"]
        if kind == "baseline":
            rows = [("clip_rgb", ("baseline", *base, ckpt), line.get("name") or f"CLIP {base[0]} ({base[1]})")]
        elif kind == "student":
            rows = [("clip_rgb", ("patched", teacher), named("patched CLIP", line["teacher"])),
                    ("student_ms", ("student", ckpt), named("student", line["ckpt"]))]
        else:
            rows = [("clip_rgb", (kind, ckpt), named({"patched": "patched CLIP"}.get(kind, "fine-tuned CLIP"), line["ckpt"]))]
        for encoder, row, name in rows:
            for col, task in ((column, "zeroshot"), (probe_column, "linear_probe")):
                value = line.get(f"{task}/{encoder}/acc1", line.get(f"{task}/{encoder}/mean_average_precision"))
                if value is not None:
                    cells[row, col], names[row] = (100 * value, base), name
                    if kind == "baseline":
                        baselines[base, col] = 100 * value
    table = {}
    for (row, column), (value, base) in cells.items():
        reference = baselines.get((base, column))
        table.setdefault(row, {})[column] = (value, None if reference is None or row[0] == "baseline"
                                             else value - reference)
    shown = list(names.values())  # other weights saved at one path: told apart by their hash
    return table, {row: f"{name} [{str(row[-1])[:8]}]" if shown.count(name) > 1 else name for row, name in names.items()}


def summary_layout(table, names):
    """The rows and columns of summary_rows() as shown: (rows in order, their names, columns, their labels)."""
    columns = sorted({c for cells in table.values() for c in cells},  # zero-shot columns first, then the probes'
                     key=lambda c: (len(c), tuple(map(str, c))))
    labels = []
    for data, split, n, prompts, root, seed, *probe in columns:  # probe: ['linear probe'] or []
        same = [c for c in columns if c[:2] == (data, split) and c[6:] == tuple(probe)]
        differ = lambda k: len({c[k] for c in same}) > 1  # noqa: E731
        shown = os.path.relpath(root) if root and not os.path.relpath(root).startswith("../..") else root
        labels.append(f"{data} {split}{' linear probe' if probe else ''}, {n} images"
                      + (f" (seed {seed})" if differ(5) else "")
                      + (f" [prompts {(prompts or 'unknown')[:8]}]" if differ(3) else "")
                      + (f" [{shown or 'unknown root'}]" if differ(4) else ""))
    kinds = ["baseline", "patched", "finetuned", "student"]
    order = sorted(table, key=lambda r: (kinds.index(r[0]), names[r]))
    return order, [names[r] for r in order], columns, labels


def summary_table(table, names, fmt="md"):
    """Text of summary_rows(): markdown (pastes into a README) or csv."""
    order, names, columns, labels = summary_layout(table, names)
    cell = lambda v: "" if v is None else f"{v[0]:.2f}" + ("" if v[1] is None else f" ({v[1]:+.2f})")  # noqa: E731
    if fmt == "csv":  # for machines: numbers, the gain in a column of its own
        import csv
        import io
        number = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        out = io.StringIO()
        csv.writer(out).writerows([["model", *[x for label in labels for x in (label, f"{label} gain")]]] + [
            [name, *[number(x) for c in columns for x in table[r].get(c, (None, None))]] for r, name in zip(order, names)])
        return out.getvalue().rstrip("\n")
    rows = [[name] + [cell(table[r].get(c)) for c in columns] for r, name in zip(order, names)]
    return "\n".join(["| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def summary(path, fmt, plot=None):
    """--summary: the results log as the paper's table; with --summary-plot FILE also as grouped bars."""
    if plot:  # checked before anything is printed
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise C.UserError(f"--summary-plot {plot} needs matplotlib; pip install matplotlib, or drop --summary-plot")
        C.check_writable(plot, "--summary-plot")
    if not os.path.isfile(path):
        raise C.UserError(f"no results log {path}; run 03_eval.py first, or pass --summary FILE")
    try:
        with open(path) as f:
            table, names = summary_rows([json.loads(line) for line in f if line.strip()])
    except ValueError as e:
        raise C.UserError(f"{path} is not a JSON-lines results log ({e}); pass the --results file of 03_eval.py")
    if not table:
        raise C.UserError(f"{path} holds no zero-shot results; run 03_eval.py first")
    print(summary_table(table, names, fmt))
    if fmt == "md":
        print("\ntop-1 accuracy (mAP for multi-label data) in %; in brackets the gain over the un-patched CLIP of "
              "the same model and tag in the same column" + ("; 'linear probe' columns: a logistic-regression probe on "
              "the frozen embeddings (03_eval.py --linear-probe), the others zero-shot"
              if any(len(c) > 6 for cells in table.values() for c in cells) else ""))
    if plot:
        order, names, columns, labels = summary_layout(table, names)
        plot_summary(plot, names, labels, [[table[r].get(c, (None,))[0] for c in columns] for r in order])
        if fmt == "md":  # csv goes to stdout as it is
            print(f"wrote {plot}")


# ============================================================================ pictures


def modality_gap_pca(features, max_scenes=2000):
    """The data of modality_gap.png: up to max_scenes test scenes (evenly spaced; 'index' their rows)
    and, before (student_init_ms) and after (student_ms) alignment, the normalised teacher RGB and
    student MS embeddings of those scenes stacked and projected on the 2 principal components of the
    stack (the SVD of the centred stack, each component's sign set so that its largest loading is
    positive, as sklearn's svd_flip): 'rgb', 'ms' ((n, 2) each, row i the same scene) and
    'explained_variance_ratio' (S_i^2 / sum S^2)."""
    n = len(features["clip_rgb"])
    index = torch.linspace(0, n - 1, min(n, max_scenes)).round().long()
    rgb = F.normalize(features["clip_rgb"][index].double(), dim=-1)
    data = {"index": index.tolist(), "n_scenes": n}
    for when, name in (("before", "student_init_ms"), ("after", "student_ms")):
        if name in features:
            x = torch.cat([rgb, F.normalize(features[name][index].double(), dim=-1)])
            centred = x - x.mean(dim=0)
            _, s, vt = torch.linalg.svd(centred, full_matrices=False)
            vt = vt[:2] * torch.sign(vt[:2].gather(1, vt[:2].abs().argmax(dim=1, keepdim=True)))
            coords = (centred @ vt.T).float()
            data[when] = {"rgb": coords[:len(index)].tolist(), "ms": coords[len(index):].tolist(),
                          "explained_variance_ratio": (s[:2] ** 2 / (s ** 2).sum()).tolist()}
    return data


def plot_modality_gap(folder):
    """modality_gap.png: the normalised test embeddings of teacher (RGB) and student (MS) on the 2
    principal components of both (modality_gap_pca.json), before and after alignment, 12 true pairs
    joined, the centroids as rings (points drawn over them); titles from metrics.json's modality gap."""
    pca = C.read_json(os.path.join(folder, "modality_gap_pca.json"))
    gap = C.read_json(os.path.join(folder, "metrics.json"))["metrics"]["modality_gap"]
    panels = [when for when in ("before", "after") if when in pca]
    figure, axes = C.new_figure(9, 4.6, ncols=len(panels))
    number = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731  (None: NaN in the JSON)
    for ax, when in zip(axes, panels):
        rgb, ms, g, ratio = np.array(pca[when]["rgb"]), np.array(pca[when]["ms"]), gap[when], \
            pca[when]["explained_variance_ratio"]
        pairs = np.unique(np.linspace(0, len(rgb) - 1, min(len(rgb), 12)).round().astype(int))
        ax.plot(np.stack([rgb[pairs, 0], ms[pairs, 0]]), np.stack([rgb[pairs, 1], ms[pairs, 1]]), color="0.6", lw=0.8)
        for points, colour, label in ((rgb, "tab:blue", "teacher, RGB"), (ms, "tab:orange", "student, MS")):
            ax.scatter(points[:, 0], points[:, 1], s=10, color=colour, alpha=0.6, lw=0, label=label, zorder=3)
            ax.scatter(*points.mean(axis=0), s=150, marker="o", facecolor="none", edgecolor=colour, lw=1.5, zorder=2)
        ax.set(xlabel=f"PC 1 ({100 * ratio[0]:.0f}% of variance)", ylabel=f"PC 2 ({100 * ratio[1]:.0f}% of variance)",
               aspect="equal", title=f"{when} alignment\ncentroid distance {number(g['centroid_distance'])}; mean "
               f"cosine of\ntrue pairs {number(g['true_pair_cosine'])}, random pairs {number(g['random_pair_cosine'])}")
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"modality gap: normalised test embeddings, {len(pca['index'])} scenes, PCA of both modalities")
    return figure


def plot_zeroshot(folder):
    """confusion.png (per_class_ap.png for multi-label data): each encoder's zero-shot confusion matrix,
    rows divided by their class's images (the diagonal is the per-class recall), or its average
    precision per class as bars, from metrics.json."""
    metrics = C.read_json(os.path.join(folder, "metrics.json"))
    zeroshot = metrics["metrics"]["zeroshot"]
    if "per_class_ap" in zeroshot["clip_rgb"]:
        figure, (ax,) = C.new_figure(9, 6)  # the classes in the data set's order, as the printed table
        classes, height = metrics.get("classes") or list(zeroshot["clip_rgb"]["per_class_ap"]), 0.8 / len(zeroshot)
        for k, (name, m) in enumerate(zeroshot.items()):
            ax.barh(np.arange(len(classes)) + k * height, [math.nan if m["per_class_ap"][c] is None else
                                                                 100 * m["per_class_ap"][c] for c in classes],
                    height, label=f"{name} (mAP {100 * m['mean_average_precision']:.1f}%)")
        ax.set_yticks(np.arange(len(classes)) + 0.4 - height / 2, classes, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 100), xlabel="average precision (%)", title="zero-shot average precision per class (test)")
        ax.legend(fontsize=8)
        return figure
    figure, axes = C.new_figure(9, 5, ncols=len(zeroshot), sharey=True)
    for ax, (name, m) in zip(axes, zeroshot.items()):
        counts, classes = np.array(m["confusion_matrix"]["counts"]), m["confusion_matrix"]["classes"]
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(counts if len(classes) <= 12 else []):
            ax.text(j, i, count, ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_title(f"{name}, zero-shot: top-1 {100 * m['acc1']:.1f}%", fontsize=10)
    axes[0].set_ylabel("true class (test split)")
    figure.colorbar(image, ax=list(axes), shrink=0.7, label="fraction of the true class's images")
    return figure


def plot_summary(path, models, settings, values):
    """--summary-plot FILE: the table as grouped bars, one group per setting, one bar per model (in %)."""
    figure, (ax,) = C.new_figure(8, 4)
    for k, (model, row) in enumerate(zip(models, values)):
        bars = ax.bar(np.arange(len(settings)) + (k - (len(models) - 1) / 2) * 0.8 / len(models),
                      [math.nan if v is None else v for v in row], 0.8 / len(models), label=model)
        ax.bar_label(bars, ["" if v is None else f"{v:.1f}" for v in row], fontsize=7)
    ax.set_xticks(np.arange(len(settings)), settings, fontsize=8, rotation=15, ha="right")
    probe = any("linear probe" in s for s in settings)
    ax.set(ylabel="top-1 accuracy or mAP (%)", ylim=(0, 108),
           title="zero-shot classification" + (" and linear probe" if probe else ""))
    figure.legend(loc="outside lower center", ncols=min(3, len(models)), fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    C.write_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))


def append_jsonl(path, row):
    """One JSON line appended in one write: runs sharing a results log never interleave their lines."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(C.tidy(row), sort_keys=True, default=str) + "\n").encode())
    finally:
        os.close(fd)


def pictures(folder):
    """The pictures an evaluation's JSON supports: {file name: function drawing it}."""
    multilabel = "per_class_ap" in C.read_json(os.path.join(folder, "metrics.json"))["metrics"]["zeroshot"]["clip_rgb"]
    return {**({"modality_gap.png": plot_modality_gap} if os.path.isfile(os.path.join(folder, "modality_gap_pca.json"))
               else {}), ("per_class_ap.png" if multilabel else "confusion.png"): plot_zeroshot}


# ============================================================================ main


def main(argv=None):
    return C.run_stage(run, parse_args(argv))


def run(args):
    if args.summary:
        return summary(args.summary, args.summary_format, args.summary_plot)
    if args.redraw:
        return C.redraw(args.redraw, STAGE, pictures, args.debug)
    device = C.pick_device(args.device)
    kind, record, clip_meta = read_checkpoint(args)
    records = trainings(args, kind, record, clip_meta)
    plans = [plan_split(name, root, args, kind, records) for name, root in data_specs(args, records)]
    outs = [default_out(args, kind, scenes, len(plans) > 1) for scenes, _, _ in plans]
    for out in outs:  # all bad input is refused before any run folder is made, and before the slow part
        C.check_run(out, STAGE, overwrite=args.overwrite)
    C.check_writable(args.results, "--results")
    opened = lambda scenes: C.open_images(scenes, args.cache, args.workers, args.skip_bad_files)  # noqa: E731
    datasets = [opened(scenes) for scenes, _, _ in plans]
    probes = [{s: opened(part) for s, part in probe.items()} if probe else None for _, _, probe in plans]
    torch.manual_seed(0)  # only a baseline with --pretrained none draws random numbers (its weights)
    models = load_models(args, kind, device)
    done = []
    for (scenes, case, _), dataset, probe, out in zip(plans, datasets, probes, outs):
        try:
            with C.run_folder(out, STAGE, overwrite=args.overwrite) as work:
                append_jsonl(args.results, evaluate(scenes, case, dataset, work, models, args, kind, device, probe))
            done.append(scenes.dataset)
            print(f"\nwrote {out}/metrics.json; appended to {args.results}")
            if not args.no_plots:
                C.draw_pictures(out, pictures(out), args.debug)
            print()  # a blank line before the next data set
        except (C.UserError, KeyboardInterrupt) as e:  # e.g. an unreadable image: the finished data sets stay
            rest = plans[len(done):]
            go_on = " ".join(f"{s.dataset}={s.root}" for s, _, _ in rest) + (
                f" --out {outs[len(done)]}" if args.out and len(plans) > 1 and len(rest) == 1 else "")
            note = f"finished before it: {', '.join(done)}; go on with --data {go_on}" if rest else \
                f"every data set finished ({', '.join(done)})"
            if not done:
                note = f"{out} was not written; run the same command again"
            raise type(e)(f"{e}; {note}" if str(e) else note) from None


if __name__ == "__main__":
    main()
