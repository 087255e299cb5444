"""Stage 3: evaluate any model on any data set, zero-shot: the paper's claims are transfer claims.

    python 03_eval.py --ckpt runs/align --data eurosat_ms   # the aligned student and its teacher
    python 03_eval.py --ckpt runs/patch --data eurosat resisc45=data/NWPU-RESISC45 \\
        imagenet=data/imagenet/val                          # several data sets, one run each
    python 03_eval.py --model ViT-B-32 --pretrained openai --data eurosat   # un-patched baseline
    python 03_eval.py --summary                             # the paper's table, runs/results.jsonl

What it measures and writes, and how: docs/evaluation.md; released weights: docs/released.md.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import common as C

STAGE = "03_eval.py"
CKPT_HINT = ("pass --ckpt OUT, the run folder of 01_patch_clip.py (a patched CLIP) or of "
             "02_align_s2.py (a student, or its student.pt), or leave out --ckpt and pass "
             "--model/--pretrained for an un-patched CLIP")
RECALL_AT = (1, 5, 10, 20, 50)  # the official code's cut-offs


def parse_args(argv=None):
    p = C.Flags(__doc__)
    add = p.add_argument
    add("--ckpt", help="stage 1's run folder (a patched CLIP), stage 2's run folder or student.pt "
        "(a student) (default: none, the un-patched --model/--pretrained)")
    add("--model", help="open_clip model of the un-patched baseline, or base of a released file "
        "(default: ViT-B-32; its name's)")
    add("--pretrained", help="its open_clip tag, weights file, or 'none' (default: openai)")
    add("--name", help="the un-patched model's name in --summary, e.g. RemoteCLIP for its weights "
        "file (default: CLIP and the tag, or the weights file's name)")
    add("--teacher", help="a student's teacher, a stage-1 run folder (default: the one it "
        "records); a released student's: their patched CLIP or 'base'")
    add("--student-init", help="the untrained student (default: the one beside it)")
    add("--rgb-scale", type=C.number(float, 0, above=True), help="N of the RGB composite's x "
        "255/N (default: the data set's; the official SEN12MS: 2000)")
    add("--data", nargs="+", metavar="NAME[=ROOT]", help="data sets to evaluate, NAME one of the "
        "README's data table (default: the checkpoint's own; eurosat for the baseline)")
    add("--root", help="folder of a single --data NAME (default: data/<name>, or the checkpoint's "
        "own folder)")
    add("--download", action="store_true", help="download EuroSAT (RGB or MS) first")
    add("--split", default="test", choices=("test", "val", "all"), help="split to evaluate "
        "(official where there is one); 'all' only on data the models were not trained on "
        "(default: test)")
    add("--split-seed", type=C.number(int, 0), help="split seed (default: the checkpoint's on "
        "the scenes it was trained on, else 0)")
    add("--prompts", help="JSON file of class names and/or templates (default: the checkpoint's on "
        "its own data set, else the data set's own; docs/evaluation.md)")
    add("--batch-size", type=C.number(int, 1), default=256,
        help="images per forward pass (default: 256)")
    add("--results", default="runs/results.jsonl",
        help="results log, a JSON line per evaluation (default: %(default)s)")
    add("--save-embeddings", action="store_true", help="also write OUT/embeddings.pt (embeddings, "
        "labels, files, head; with --linear-probe also train and val)")
    add("--linear-probe", action="store_true", help="also fit a logistic-regression probe per "
        "encoder on the frozen train embeddings, C chosen on val, scored on test "
        "(docs/evaluation.md)")
    add("--summary", nargs="?", const="runs/results.jsonl", metavar="RESULTS", help="only print "
        "the paper's table of a results log: top-1 (mAP) per model and data set, and the gain "
        "over the un-patched CLIP")
    add("--summary-format", default="md", choices=("md", "csv"),
        help="markdown or csv (default: md)")
    add("--summary-plot", metavar="FILE",
        help="with --summary: also draw it as grouped bars into FILE.png")
    C.add_run_flags(p, None, "run folder (default: <checkpoint folder>-eval-<data>-<split>-<root "
                    "hash>, or runs/eval/<model>-<pretrained>-...); with several --data, a "
                    "<data>-<split> each", training=False)
    args = p.parse_args(argv)
    if args.summary_plot and not args.summary:
        p.error("--summary-plot draws the table of --summary; pass --summary too")
    if args.linear_probe and args.split != "test":
        p.error("--linear-probe trains on the train split and picks C on the val split; it "
                f"scores the test split, drop --split {args.split}")
    return args


# ============================================================================ metrics and measure()


def topk_accuracy(logits, labels, k):
    """Top-k accuracy (CLIP_benchmark's acc1, acc5): the fraction of images whose label is among
    their k highest logits; k capped at the number of classes."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def per_class_recall(pred, labels, n_classes):
    """Per-class accuracy: the fraction of each class's images predicted as that class (NaN for a
    class without images)."""
    hits = torch.bincount(labels[pred == labels], minlength=n_classes).double()
    return hits / torch.bincount(labels, minlength=n_classes).double()  # 0/0 = NaN


def confusion_matrix(pred, labels, n_classes):
    """Confusion matrix (sklearn's): counts[i, j] = images of class i predicted as class j."""
    counts = torch.bincount(labels * n_classes + pred, minlength=n_classes ** 2)
    return counts.reshape(n_classes, n_classes)


def balanced_accuracy(pred, labels, n_classes):
    """Mean per-class recall (CLIP_benchmark's mean_per_class_recall, sklearn's
    balanced_accuracy_score) over the classes that have images."""
    return per_class_recall(pred, labels, n_classes).nanmean().item()


def precision_at_k(scores, positives, k=10):
    """Precision@k: the fraction of positives among the k highest-scoring images (all when
    fewer); ties at the cut are broken pessimistically."""
    by_label = torch.argsort(positives.int(), stable=True)  # negatives first
    order = by_label[torch.argsort(scores[by_label], descending=True, stable=True)]
    return positives[order[:k]].double().mean().item()


def true_match_ranks(queries, gallery, chunk=1024):
    """Rank (0 = first) of each query's true match, gallery row i for query row i, by cosine
    similarity; a tie with the true match counts against it."""
    q, g = F.normalize(queries.float(), dim=-1), F.normalize(gallery.float(), dim=-1)
    ranks = []
    for start in range(0, len(q), chunk):
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
    random_pairs = (a.sum(0) @ b.sum(0) - true_pairs.sum()).item() / (n * (n - 1)) if n > 1 \
        else math.nan
    return {"centroid_distance": (a.mean(0) - b.mean(0)).norm().item(),
            "true_pair_cosine": true_pairs.mean().item(), "random_pair_cosine": random_pairs}


def zeroshot_metrics(logits, labels, classes):
    """Zero-shot classification metrics of one encoder, as CLIP_benchmark reports them, and for
    single-label data the confusion matrix."""
    if labels.ndim == 2:
        mean_ap, aps = C.mean_average_precision(logits, labels)
        return {"mean_average_precision": mean_ap, "per_class_ap": dict(zip(classes, aps.tolist()))}
    pred, n = logits.argmax(dim=1), len(classes)
    return {"acc1": topk_accuracy(logits, labels, 1), "acc5": topk_accuracy(logits, labels, 5),
            "mean_per_class_recall": balanced_accuracy(pred, labels, n),
            "per_class": dict(zip(classes, per_class_recall(pred, labels, n).tolist())),
            "confusion_matrix": {"classes": list(classes),
                                 "counts": confusion_matrix(pred, labels, n).tolist()}}


def text_to_image(head, features, targets, classes):
    """Each class's head vector as a query over the images: AP and precision@10 per class,
    means over the classes with images."""
    scores = F.normalize(features.float(), dim=-1) @ head
    mean_ap, aps = C.mean_average_precision(scores, targets)
    p10 = torch.tensor([precision_at_k(scores[:, c], targets[:, c], 10) if targets[:, c].any()
                        else math.nan for c in range(len(classes))])
    return {"mean_average_precision": mean_ap, "precision_at_10": p10.nanmean().item(),
            "per_class_ap": dict(zip(classes, aps.tolist()))}


def cross_modal(ms, rgb):
    """Recall@k of MS -> RGB and RGB -> MS retrieval of the same scenes, k in RECALL_AT."""
    return {name: {f"recall@{k}": recall_at_k(ranks, k) for k in RECALL_AT}
            for name, ranks in (("ms_to_rgb", true_match_ranks(ms, rgb)),
                                ("rgb_to_ms", true_match_ranks(rgb, ms)))}


def measure(features, labels, head, logit_scale, classes):
    """The figures of test embeddings ({encoder: (N, D)}, row i one scene): zero-shot metrics,
    text -> image retrieval; for a student, cross-modal recall@k and the modality gap."""
    evaluated = [name for name in features if name != "student_init_ms"]
    targets = labels.bool() if labels.ndim == 2 else F.one_hot(labels, len(classes)).bool()
    metrics = {"zeroshot": {}, "text_to_image": {}}
    for name in evaluated:
        logits = C.zeroshot_logits(features[name], head, logit_scale)
        metrics["zeroshot"][name] = zeroshot_metrics(logits, labels, classes)
        metrics["text_to_image"][name] = text_to_image(head, features[name], targets, classes)
    if "student_ms" in features:
        rgb = features["clip_rgb"]
        metrics["cross_modal"] = cross_modal(features["student_ms"], rgb)
        metrics["modality_gap"] = {when: modality_gap(features[name], rgb) for when, name in
                                   (("after", "student_ms"), ("before", "student_init_ms"))
                                   if name in features}
    return metrics


# ============================================================================ linear probe


PROBE_CS = tuple(10.0 ** k for k in range(-6, 7))  # the CLIP paper's range of C = 1/lambda


def fit_logistic(x, y, c, n_classes, max_iter=1000):
    """Logistic regression minimising mean_i loss_i + ||W||^2 / (2 c N), sklearn's (lbfgs):
    returns (W, b, converged). In full: docs/evaluation.md."""
    x = x.double()
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)

    def data_loss(z):  # K binary probes, or a multinomial one
        if y.ndim == 2:
            return F.binary_cross_entropy_with_logits(z, y.double(), reduction="sum") / len(x)
        return F.cross_entropy(z, y.long())
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7,
                                  tolerance_change=1e-12, history_size=10,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = data_loss(x @ w + b) + (w * w).sum() / (2 * c * len(x))
        loss.backward()
        return loss
    optimizer.step(objective)
    state = optimizer.state[w]
    converged = state["n_iter"] < max_iter and state["func_evals"] < max_iter * 5 // 4
    return w.detach(), b.detach(), converged


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, cs=PROBE_CS):
    """The CLIP paper's linear probe: fitted on train, C chosen on val, scored on test. In
    full: docs/evaluation.md."""
    train_x, val_x, test_x = (F.normalize(x.double(), dim=-1) for x in (train_x, val_x, test_x))
    multilabel = train_y.ndim == 2
    n_classes = train_y.shape[1] if multilabel else \
        1 + max(int(y.max()) for y in (train_y, val_y, test_y))
    metric = "mean_average_precision" if multilabel else "acc1"

    def score(x, y, fit):
        logits = x @ fit[0] + fit[1]
        return C.mean_average_precision(logits, y)[0] if multilabel else \
            topk_accuracy(logits, y, 1)
    fits = [fit_logistic(train_x, train_y, c, n_classes) for c in cs]
    val_scores = [score(val_x, val_y, fit) for fit in fits]
    best = int(torch.tensor(val_scores).nan_to_num(-1.0).argmax())  # the smaller C on ties
    return {metric: score(test_x, test_y, fits[best]), "C": cs[best],
            "val_score": val_scores[best], "converged": fits[best][2],
            "val_scores": [[c, s] for c, s in zip(cs, val_scores)],
            "n_train": len(train_x), "n_val": len(val_x)}


# ============================================================================ checkpoints and data


@dataclasses.dataclass
class Checkpoint:
    """resolve_checkpoint's answer, read instead of the flags."""
    kind: str  # baseline, patched, finetuned or student
    path: str | None  # the file or folder evaluated (a student: student.pt)
    model: str
    pretrained: str
    teacher: str | None = None
    record: dict | None = None
    clip_meta: dict | None = None  # the CLIP's patched.json
    init: str | None = None
    released: tuple = ()  # the authors' files among them


def resolve_checkpoint(args):
    """What --ckpt is, before a model is loaded. In full: docs/evaluation.md."""
    base = (args.model, args.pretrained)
    wrong = C.UserError("--teacher, --model, --pretrained, --name: not for this checkpoint")
    if args.name if args.ckpt else args.teacher:
        raise wrong
    if args.ckpt is None:
        return Checkpoint("baseline", None, args.model or "ViT-B-32", args.pretrained or "openai")
    if not os.path.exists(args.ckpt):
        raise C.UserError(f"--ckpt {args.ckpt} does not exist; {CKPT_HINT}")
    path = args.ckpt
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    name = os.path.basename(path)
    if os.path.isfile(os.path.join(folder, "patched.json")) and (folder == path or name in (
            "patched.json", C.OPEN_CLIP_CONFIG, C.OPEN_CLIP_WEIGHTS, "finetuned.pt")):
        if args.teacher or any(base):
            raise wrong
        meta = C.read_json(os.path.join(folder, "patched.json"))
        kind = "finetuned" if name == "finetuned.pt" else "patched"
        return Checkpoint(kind, path, meta.get("model"), meta.get("pretrained"), clip_meta=meta)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "student.pt")):
            inside = sorted(f for f in os.listdir(path)
                            if f.endswith((".pt", ".json", ".safetensors")))
            raise C.UserError(f"--ckpt {path} is a folder without patched.json or student.pt (it "
                              f"holds {', '.join(inside) or 'no checkpoint files'}); {CKPT_HINT}")
        path = os.path.join(path, "student.pt")
    record = C.load_torch(path, "--ckpt", CKPT_HINT) if path.endswith(".pt") else None
    theirs = isinstance(record, dict) and isinstance(record.get("model"), dict)
    if theirs and C.STUDENT_KEY not in record["model"]:  # their CLIP
        if args.teacher:
            raise wrong
        meta = C.released_meta(path, *base)
        kind = "finetuned" if meta["alpha"] == 1 else "patched" if meta["alpha"] else "baseline"
        return Checkpoint(kind, path, meta["model"], meta["pretrained"],
                          clip_meta=meta if meta["alpha"] else None, released=(path,))
    if theirs:
        record, teacher = C.released_meta(path, *base), args.teacher
        init = C.RELEASED_NAME.sub("_zs.pt", path)
        if not teacher:
            raise C.UserError(f"--ckpt {path}: pass --teacher FILE (their patched CLIP) or base")
    elif not isinstance(record, dict) or record.get("kind") != "rsclip-align/student":
        raise C.UserError(f"--ckpt {path} is of an unknown kind; {CKPT_HINT}")
    else:
        teacher = args.teacher or record["teacher"]["path"]
        init = os.path.join(os.path.dirname(path), "student_init.pt")
    if not (os.path.isfile(init) and init != path and (not theirs or (
            C.STUDENT_KEY in C.load_torch(init, "", "")["model"]))):
        init = None  # or the CLIP's: both stages write ..._zs.pt
    released, meta = (path,) * theirs + (teacher,) * C.released(teacher), None
    if teacher != "base" or not theirs:
        if not os.path.exists(teacher):
            raise C.UserError(f"the student's teacher {teacher} does not exist; pass --teacher "
                              "FOLDER, the stage-1 run folder the student was aligned to")
        meta = C.released_meta(teacher, *base) if teacher in released else \
            C.read_json(os.path.join(C.patched_folder(teacher), "patched.json"))
    if not theirs and meta["weights_sha256"] != record["teacher"]["weights_sha256"]:
        raise C.UserError(f"{teacher} is not the CLIP that {path} was aligned to (other weights); "
                          "pass --teacher FOLDER of that stage-1 run")
    if any(base) and not released:
        raise wrong
    return Checkpoint("student", path, (meta or record)["model"], (meta or record)["pretrained"],
                      teacher, record, meta, args.student_init or init, released)


def trainings(ckpt):
    """What each evaluated model was trained on, the CLIP first."""
    out, meta, record = [], ckpt.clip_meta, ckpt.record
    if meta is not None:
        path = ckpt.teacher if ckpt.kind == "student" else ckpt.path
        out.append({"path": path, "encoder": "clip_rgb", "record": meta, "seed": meta["split_seed"],
                    "train_scenes": lambda: C.trained_scenes(meta, path)})
    if ckpt.kind == "student":
        out.append({"path": ckpt.path, "encoder": "student_ms", "record": record,
                    "seed": record["split_seed"],
                    "train_scenes": lambda: C.trained_scenes(record, ckpt.path)})
    return out


def data_specs(args, records):
    """[(name, root)] from --data and --root; by default the checkpoint's own."""
    trained_roots = {r["record"]["dataset"]: r["record"].get("root") for r in records
                     if r["record"].get("root") and os.path.isdir(r["record"]["root"])}
    names = args.data or [records[-1]["record"]["dataset"] if records else "eurosat"]
    specs = []
    for item in names:
        name, sep, root = item.partition("=")
        if name not in C.DATA:
            raise C.UserError(f"unknown --data '{name}'; choose among {', '.join(C.DATA)}, each as "
                              "NAME or NAME=ROOT")
        if sep and not root:
            raise C.UserError(f"--data {item} names no folder after '='; write {name}=ROOT, or "
                              f"{name} alone")
        specs.append([name, root or None])
    if args.root:
        if len(specs) > 1 or specs[0][1]:
            raise C.UserError("--root is for a single --data NAME; give several data sets as "
                              "--data NAME=ROOT ...")
        specs[0][1] = args.root
    if len({name for name, _ in specs}) < len(specs):
        raise C.UserError(f"--data names a data set twice ({' '.join(names)}); evaluate each "
                          "folder in its own run")
    return [(name, root or trained_roots.get(name)) for name, root in specs]


def plan_split(name, root, args, ckpt, records):
    """(split, case per encoder, probe splits). In full: docs/evaluation.md."""
    scenes = C.list_scenes(name, root, args.download)
    if ckpt.kind == "student":
        bands = tuple(ckpt.record.get("bands", C.S2_BANDS))
        if scenes.modality != "ms" or scenes.pixels.student_bands != bands:
            others = [n for n in C.MS_DATASETS if C.DATA[n].pixels.student_bands == bands]
            raise C.UserError(f"the student reads {'/'.join(bands[:2])}"
                              f"{'/...' if len(bands) > 2 else ''}, --data {name} does not hold "
                              "them; pass " + " or ".join(f"--data {n}" for n in others))
    ids, copied = {C.scene_id(f) for f in scenes.files}, {}
    for r in records:  # a copy of its training data?
        if not C.trained_on(r["record"], scenes) and \
                list(r["record"]["classes"]) == list(scenes.classes):
            copied[r["path"]] = len(ids & r["train_scenes"]())
    own = [r for r in records if C.trained_on(r["record"], scenes) or copied.get(r["path"])]
    seeds, official = {r["seed"] for r in own}, C.DATA[name].official_splits
    if own and args.split == "all":
        raise C.UserError(f"--split all would evaluate {own[0]['path']} on the scenes it was "
                          f"trained on ({name}); pass --split test (its held-out split)")
    if len(seeds) > 1 and not official:
        raise C.UserError(f"the student and its teacher hold out other {name} scenes (split seeds "
                          f"{sorted(seeds)}); evaluate them on another data set, or align with "
                          "the teacher's seed")
    seed = min(seeds) if own else (args.split_seed if args.split_seed is not None else 0)
    if own and args.split_seed is not None and args.split_seed != seed and not official:
        raise C.UserError(f"--split-seed {args.split_seed} differs from the seed {seed} that "
                          f"{own[0]['path']} was trained with: its {args.split} split would "
                          "overlap the training images; drop --split-seed")
    # one head: the prompts the student, else its teacher, was trained with here
    split = C.head_prompts(C.take_split(scenes, args.split, seed),
                           [r["record"] for r in reversed(own)], args.prompts)
    total, dropped = len(split.files), {r["path"]: trained_elsewhere(split, r)
                                        for r in records if r not in own}
    unseen = ~np.logical_or.reduce([np.zeros(total, bool), *dropped.values()])
    split = split.subset(np.flatnonzero(unseen), split.split)
    if not split.files:
        other = [s for s in ("test", "val", "all") if s != args.split and (s != "all" or not own)]
        why = f" once the {total} scenes its models trained on in another release are dropped" \
            if total else ""
        raise C.UserError(f"the {args.split} split of {name} in {scenes.root} is empty{why}; pass "
                          f"--split {' or '.join(other)}, or add images")
    for record in own:
        C.check_held_out(split, record["train_scenes"](), record["path"])
    probe = {s: C.take_split(scenes, s, seed) for s in ("train", "val")} if args.linear_probe \
        else None
    for s, part in (probe or {}).items():
        if not part.files:
            raise C.UserError("--linear-probe fits on the train split and picks C on the val "
                              f"split; the {s} split of {name} in {scenes.root} (seed {seed}) is "
                              "empty: add images, or drop --linear-probe")
    case = {"clip_rgb": "transfer"}
    for r in records:
        n, gone = copied.get(r["path"]), sum(dropped.get(r["path"], ()))
        case[r["encoder"]] = "transfer" if r not in own else "trained on" if not n else \
            f"trained on ({n} of its {len(ids)} scenes have the ids of its training scenes: a " \
            "copy of its training data)"
        if gone:
            case[r["encoder"]] += f" ({gone} of {total} scenes dropped: trained on in " \
                f"{r['record']['dataset']}; {len(split.files)} remain)"
    return split, case, probe


def trained_elsewhere(split, r):
    """Which scenes of the split r's model trained on in another release of them (BigEarthNet v2.0
    names each patch's v1.0 id: C.train_ids), a bool each."""
    if not split.aliases and not C.DATA[r["record"]["dataset"]].renames:
        return np.zeros(len(split.files), bool)
    trained, own = r["train_scenes"](), C.scene_set(split.dataset, split.root)
    aliases = split.aliases or [None] * len(split.files)
    return np.array([a in trained or f"{own}:{C.scene_id(f)}" in trained
                     for f, a in zip(split.files, aliases)], bool)


def load_models(ckpt, device):
    """The CLIP and its tokenizer; a student and its start (ckpt.init)."""
    student = ckpt.kind == "student"
    path = ckpt.teacher if student else ckpt.path
    if path in (None, "base"):
        clip, tokenizer, _ = C.load_clip(ckpt.model, ckpt.pretrained, device)
    else:
        clip, _, tokenizer = C.load_teacher(path, device, "--teacher" if student else "--ckpt",
                                            (ckpt.model, ckpt.pretrained) * (path in ckpt.released),
                                            ckpt.clip_meta)
    if ckpt.kind == "finetuned" and not ckpt.released:  # the fine-tuned image tower
        clip.visual.load_state_dict(C.load_torch(ckpt.path, "--ckpt", "re-run 01_patch_clip.py"))
    models = {"clip": clip.eval(), "tokenizer": tokenizer}
    for name, path in (("student", ckpt.path), ("student_init", ckpt.init)):
        if student and path:
            models[name] = (load_released_student(path, clip.visual.output_dim, ckpt.teacher)
                            if ckpt.path in ckpt.released else load_student(path)).to(device)
    return models


RELEASED_STUDENT = "vit_small_patch16_224"


def load_released_student(path, dim, teacher):
    """A released student, reading their input (docs/released.md)."""
    student = C.Student(RELEASED_STUDENT, dim)
    visual = torch.nn.ModuleDict({"trunk": student.backbone, "head": student.proj})
    n = C.load_released(torch.nn.ModuleDict({"visual": visual}), path, "student",
                        fix=f"its teacher {teacher} embeds in {dim}-d; pass its own")
    print(f"{path}: ignored optimizer, scaler, {n} keys")
    student.authors = True
    return student.eval()


def load_student(path):
    """A student that stage 2 saved, rebuilt, in eval mode."""
    record = C.load_torch(path, "student checkpoint", "pass a student.pt written by 02_align_s2.py")
    try:
        student = C.Student(record["arch"], record["embed_dim"], record["input_size"],
                            record["in_chans"])
        student.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise C.UserError(f"{path} does not rebuild its student ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}); pass a student.pt written by this "
                          "version of 02_align_s2.py")
    return student.eval()


def default_out(args, ckpt, scenes, several):
    """The run folder of one evaluation. In full: docs/evaluation.md."""
    name = f"{scenes.dataset}-{scenes.split}"
    if args.out:
        return os.path.join(args.out, name) if several else args.out
    name += "-" + C.sha256_of(os.path.realpath(scenes.root))[:8]
    if ckpt.path:
        folder = ckpt.path if os.path.isdir(ckpt.path) else os.path.splitext(ckpt.path)[0] \
            if ckpt.path in ckpt.released else os.path.dirname(os.path.abspath(ckpt.path))
        finetuned = "finetuned-" if ckpt.kind == "finetuned" else ""
        return f"{os.path.normpath(folder)}-{finetuned}eval-{name}"
    # a name or a local-dir's folder; a tag or a weights file's name
    model = os.path.basename(os.path.normpath(ckpt.model.split(":", 1)[-1]))
    pretrained = os.path.splitext(os.path.basename(ckpt.pretrained))[0]
    return os.path.join("runs", "eval", f"{model}-{pretrained}-{name}")


# ============================================================================ report and save


def pairing_warning(gap, margin=0.05):
    """A warning when true pairs are hardly closer than random pairs (by less than `margin`)."""
    true, random = gap["true_pair_cosine"], gap["random_pair_cosine"]
    if true is None or random is None or true - random >= margin:
        return None
    return (f"true pairs (mean cosine {true:.3f}) are hardly closer than random pairs "
            f"({random:.3f}): the student has learned the teacher's mean direction, not its "
            "scenes; do not read alignment into the smaller modality gap (train longer, or on "
            "more data)")


def small_split_caveats(n, cross_modal):
    """What a split of n images cannot measure: recall@k for k >= n, precision@10 for n < 10."""
    ks = [k for k in RECALL_AT if k >= n] if cross_modal else []
    said = ([f"recall@{', '.join(map(str, ks))} is 1 for any model"] if ks else []) \
        + (["precision@10 ranks all of them"] if n < 10 else []) \
        + (["every average precision is 1"] if n == 1 else [])
    if not said:
        return []
    return [f"{n} test images: " + "; ".join(said + ["read these as a check, not a measurement"])]


def warnings_of(metrics, n_images):
    """What the figures cannot say, printed under them and kept in metrics.json."""
    gap = metrics.get("modality_gap")
    said = [w for w in [pairing_warning(gap["after"])] if w] if gap else []
    said += small_split_caveats(n_images, "cross_modal" in metrics)
    said += [f"the linear probe of {n} at the chosen C={lp['C']:g} stopped at L-BFGS's budget "
             "before converging (separable train embeddings: more dimensions than images?); its "
             "score depends on where it stopped"
             for n, lp in metrics.get("linear_probe", {}).items() if not lp["converged"]]
    return said


def report(metrics, warnings, scenes, labels, n_skipped):
    """The printed tables of one evaluation, then its warnings."""
    zs, t2i = metrics["zeroshot"], metrics["text_to_image"]
    evaluated, multilabel = list(zs), labels.ndim == 2
    scalars = [m for m, v in zs["clip_rgb"].items() if not isinstance(v, dict)]
    print_table(f"zero-shot classification: {scenes.dataset} {scenes.split}, {len(labels)} images",
                scalars, [(name, [zs[name][m] for m in scalars]) for name in evaluated])
    table = "per_class_ap" if multilabel else "per_class"
    images = labels.bool().sum(dim=0) if multilabel else \
        torch.bincount(labels, minlength=len(scenes.classes))
    print_table(f"{table.replace('_', ' ')} (zero-shot)", ["images", *evaluated],
                [(c, [n, *(zs[name][table][c] for name in evaluated)])
                 for c, n in zip(scenes.classes, images.tolist())])
    columns = ["precision_at_10"] if multilabel else ["mean_average_precision", "precision_at_10"]
    print_table("text -> image retrieval (class prompts as queries)" + (
        "; its mAP is the zero-shot mAP above: per class, the same scores rank the same images"
        if multilabel else ""), columns, [(name, [t2i[name][m] for m in columns])
                                           for name in evaluated])
    if "linear_probe" in metrics:
        lp = metrics["linear_probe"]
        score = "acc1" if "acc1" in lp["clip_rgb"] else "mean_average_precision"
        print_table(f"linear probe: logistic regression on {lp['clip_rgb']['n_train']} train "
                    f"images, C chosen on {lp['clip_rgb']['n_val']} val images",
                    [score, "C", "val_score"],
                    [(n, [lp[n][score], f"{lp[n]['C']:g}", lp[n]["val_score"]]) for n in evaluated])
    if "cross_modal" in metrics:
        print_table("cross-modal retrieval of the same scenes", [f"recall@{k}" for k in RECALL_AT],
                    [(d, list(r.values())) for d, r in metrics["cross_modal"].items()])
        gap = metrics["modality_gap"]
        print_table("modality gap (student MS vs teacher RGB)", list(gap["after"]),
                    [(when, list(gap[when].values())) for when in ("before", "after")
                     if when in gap])
    for warning in warnings:
        print(f"warning: {warning}")
    if n_skipped:
        print(f"skipped {n_skipped} unreadable files (listed in metrics.json)")


def print_table(title, columns, rows):
    """rows: (name, values); numbers with 4 decimals, None or NaN as '-'."""
    first, widths = max(len(name) for name, _ in rows) + 2, [max(len(c), 6) + 2 for c in columns]
    shown = lambda v: "-" if v is None or v != v else f"{v:.4f}" if isinstance(v, float) else v
    print(f"\n{title}\n{'':<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for name, values in rows:
        print(f"{name:<{first}}" + "".join(f"{shown(v):>{w}}" for v, w in zip(values, widths)))


def setting_of(ckpt, name, scenes, case, n_images, prompts, skipped, out, rgb_scale):
    """What was evaluated on what: metrics.json's fields."""
    weights = ckpt.path or ckpt.pretrained  # a baseline's tag, or weights file
    weights_sha256 = C.sha256_of(weights) if os.path.isfile(weights) else None
    if ckpt.kind == "baseline" and weights_sha256 and not name:
        name = os.path.splitext(os.path.basename(weights))[0]
    path = C.patched_folder(ckpt.path, "--ckpt") if ckpt.kind == "patched" and not \
        ckpt.released else ckpt.path
    meta, teacher = ckpt.clip_meta or {}, ckpt.teacher
    return {"ckpt": os.path.abspath(path) if path else None, "ckpt_kind": ckpt.kind,
            "ckpt_sha256": meta["weights_sha256"] if ckpt.kind == "patched" else weights_sha256,
            "model": ckpt.model, "pretrained": ckpt.pretrained,
            "name": f"{name} ({ckpt.model})" if name else None,
            "teacher": teacher if teacher in (None, "base") else os.path.abspath(teacher),
            "teacher_sha256": meta.get("weights_sha256") if ckpt.kind == "student" else None,
            "rgb_scale": rgb_scale,
            "data": scenes.dataset, "root": os.path.abspath(scenes.root), "split": scenes.split,
            "split_seed": scenes.seed, "n_images": n_images, "n_classes": len(scenes.classes),
            "classes": list(scenes.classes), "chance": scenes.chance, "case": case,
            "prompts_sha256": C.sha256_of(prompts),
            "skipped_files": len(skipped), "out": os.path.abspath(out)}


def save(work, setting, details, features, results_log, embeddings=None):
    """metrics.json, modality_gap_pca.json, embeddings.pt; the results line into results_log."""
    C.write_json(os.path.join(work, "metrics.json"), {**setting, **details})
    if "student_ms" in features:
        C.write_json(os.path.join(work, "modality_gap_pca.json"), modality_gap_pca(features),
                     indent=None)
    if embeddings is not None:
        C.save_torch(os.path.join(work, "embeddings.pt"), embeddings)
    time = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    line = {k: v for k, v in setting.items() if k not in ("case", "classes")}
    append_jsonl(results_log, {"time": time, **line, **flatten({"case": setting["case"]}),
                               **flatten(details["metrics"])})


def clean(obj):
    """NaN -> None: strict JSON."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def flatten(obj, prefix=""):
    """{'a': {'b': 1}} -> {'a/b': 1}, lists left out: the results line."""
    out = {}
    for k, v in obj.items():
        if not isinstance(v, list):
            out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def append_jsonl(path, row):
    """One JSON line in one write: runs sharing a log never interleave lines."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(C.tidy(row), sort_keys=True, default=str) + "\n").encode())
    finally:
        os.close(fd)


# ============================================================================ --summary


def summary_rows(lines):
    """The paper's table from results-log lines. In full: docs/evaluation.md."""
    cells, baselines, names = {}, {}, {}
    named = lambda what, path: f"{what} {shown_path(path)}" + " (released by the authors)" * bool(
        C.RELEASED_NAME.search(path))
    for line in lines:
        official = line["data"] in C.DATA and C.DATA[line["data"]].official_splits
        rgb = f" x 255/{line['rgb_scale']:g}" if line.get("rgb_scale") else ""
        column = (line["data"] + rgb, line["split"], line["n_images"], line.get("prompts_sha256"),
                  line.get("root"),
                  None if official or line["split"] == "all" else line.get("split_seed"))
        base = (line["model"].removesuffix("-quickgelu"), line["pretrained"])
        ckpt = line.get("ckpt_sha256") or line["ckpt"]
        teacher = line.get("teacher_sha256") or line["teacher"]
        probe_column = (*column[:3], None, *column[4:], "linear probe")
        kind = line["ckpt_kind"]
        rows = [("clip_rgb", ("baseline", *base, None if kind == "student" else ckpt),
                 line.get("name") or f"CLIP {base[0]} ({base[1]})")]
        if kind == "student":
            rows = rows * (line["teacher"] == "base") or [
                ("clip_rgb", ("patched", teacher), named("patched CLIP", line["teacher"]))]
            rows.append(("student_ms", ("student", ckpt), named("student", line["ckpt"])))
        elif kind != "baseline":
            what = "patched CLIP" if kind == "patched" else "fine-tuned CLIP"
            rows = [("clip_rgb", (kind, ckpt), named(what, line["ckpt"]))]
        for encoder, row, name in rows:
            for col, task in ((column, "zeroshot"), (probe_column, "linear_probe")):
                value = line.get(f"{task}/{encoder}/acc1",
                                 line.get(f"{task}/{encoder}/mean_average_precision"))
                if value is not None:
                    cells[row, col], names[row] = (100 * value, base), name
                    if row[0] == "baseline":
                        baselines[base, col] = 100 * value
    table = {}
    for (row, column), (value, base) in cells.items():
        reference = baselines.get((base, column))
        gain = None if reference is None or row[0] == "baseline" else value - reference
        table.setdefault(row, {})[column] = (value, gain)
    shown = list(names.values())  # other weights at one path: add the hash
    return table, {row: f"{name} [{str(row[-1])[:8]}]" if shown.count(name) > 1 else name
                   for row, name in names.items()}


def shown_path(path):
    """Relative to the working folder, unless that climbs above its parent."""
    relative = os.path.relpath(path)
    return path if relative.startswith("../..") else relative


def summary_layout(table, names):
    """summary_rows() as shown: (rows, their names, columns, their labels)."""
    columns = sorted({c for cells in table.values() for c in cells},  # probes last
                     key=lambda c: (len(c), tuple(map(str, c))))
    labels = []
    for data, split, n, prompts, root, seed, *probe in columns:
        same = [c for c in columns if c[:2] == (data, split) and c[6:] == tuple(probe)]
        differ = lambda k: len({c[k] for c in same}) > 1
        shown = root and shown_path(root)
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
    cell = lambda v: "" if v is None else f"{v[0]:.2f}" + ("" if v[1] is None else
                                                          f" ({v[1]:+.2f})")
    if fmt == "csv":  # numbers, the gain in its own column
        import csv
        import io
        number = lambda v: "" if v is None else f"{v:.2f}"
        out = io.StringIO()
        csv.writer(out).writerows(
            [["model", *[x for label in labels for x in (label, f"{label} gain")]]]
            + [[name, *[number(x) for c in columns for x in table[r].get(c, (None, None))]]
               for r, name in zip(order, names)])
        return out.getvalue().rstrip("\n")
    rows = [[name] + [cell(table[r].get(c)) for c in columns] for r, name in zip(order, names)]
    return "\n".join(["| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def summary(path, fmt, plot=None):
    """--summary: the results log as the paper's table (and bars)."""
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise C.UserError(f"--summary-plot {plot} needs matplotlib; pip install matplotlib, "
                              "or drop --summary-plot")
        C.check_writable(plot, "--summary-plot")
    if not os.path.isfile(path):
        raise C.UserError(f"no results log {path}; run 03_eval.py first, or pass --summary FILE")
    try:
        with open(path) as f:
            table, names = summary_rows([json.loads(line) for line in f if line.strip()])
    except ValueError as e:
        raise C.UserError(f"{path} is not a JSON-lines results log ({e}); pass the --results file "
                          "of 03_eval.py")
    if not table:
        raise C.UserError(f"{path} holds no zero-shot results; run 03_eval.py first")
    print(summary_table(table, names, fmt))
    if fmt == "md":
        probes = any(len(c) > 6 for cells in table.values() for c in cells)
        print("\ntop-1 accuracy (mAP for multi-label data) in %; in brackets the gain over the "
              "un-patched CLIP of the same model and tag in the same column" + (
                  "; 'linear probe' columns: a logistic-regression probe on the frozen embeddings "
                  "(03_eval.py --linear-probe), the others zero-shot" if probes else ""))
    if plot:
        order, names, columns, labels = summary_layout(table, names)
        plot_summary(plot, names, labels,
                     [[table[r].get(c, (None,))[0] for c in columns] for r in order])
        if fmt == "md":  # csv goes to stdout as it is
            print(f"wrote {plot}")


# ============================================================================ pictures


def modality_gap_pca(features, max_scenes=2000):
    """The data of modality_gap.png. In full: docs/evaluation.md."""
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
    """modality_gap.png: both modalities before and after alignment, the centroids as rings."""
    pca = C.read_json(os.path.join(folder, "modality_gap_pca.json"))
    gap = C.read_json(os.path.join(folder, "metrics.json"))["metrics"]["modality_gap"]
    panels = [when for when in ("before", "after") if when in pca]
    figure, axes = C.new_figure(9, 4.6, ncols=len(panels))
    number = lambda v: "-" if v is None else f"{v:.2f}"  # None: NaN in the JSON
    for ax, when in zip(axes, panels):
        rgb, ms, g = np.array(pca[when]["rgb"]), np.array(pca[when]["ms"]), gap[when]
        ratio = pca[when]["explained_variance_ratio"]
        pairs = np.unique(np.linspace(0, len(rgb) - 1, min(len(rgb), 12)).round().astype(int))
        ax.plot(np.stack([rgb[pairs, 0], ms[pairs, 0]]), np.stack([rgb[pairs, 1], ms[pairs, 1]]),
                color="0.6", lw=0.8)
        for points, colour, label in ((rgb, "tab:blue", "teacher, RGB"),
                                      (ms, "tab:orange", "student, MS")):
            ax.scatter(points[:, 0], points[:, 1], s=10, color=colour, alpha=0.6, lw=0,
                       label=label, zorder=3)
            ax.scatter(*points.mean(axis=0), s=150, marker="o", facecolor="none", edgecolor=colour,
                       lw=1.5, zorder=2)
        ax.set(xlabel=f"PC 1 ({100 * ratio[0]:.0f}% of variance)",
               ylabel=f"PC 2 ({100 * ratio[1]:.0f}% of variance)",
               title=f"{when} alignment\ncentroid distance {number(g['centroid_distance'])}; mean "
               f"cosine of\ntrue pairs {number(g['true_pair_cosine'])}, random pairs "
               f"{number(g['random_pair_cosine'])}")
        ax.title.set_fontsize(9)
        ax.set_aspect("equal", adjustable="datalim")  # distances as they are, the panel filled
    axes[0].legend(fontsize=8)
    figure.suptitle(f"modality gap: normalised test embeddings, {len(pca['index'])} scenes, PCA "
                    "of both modalities")
    return figure


def plot_zeroshot(folder):
    """confusion.png, rows divided by their class's images; per_class_ap.png: AP bars."""
    metrics = C.read_json(os.path.join(folder, "metrics.json"))
    zeroshot = metrics["metrics"]["zeroshot"]
    if "per_class_ap" in zeroshot["clip_rgb"]:
        figure, (ax,) = C.new_figure(9, 6)
        classes = metrics.get("classes") or list(zeroshot["clip_rgb"]["per_class_ap"])
        height = 0.8 / len(zeroshot)
        for k, (name, m) in enumerate(zeroshot.items()):
            ap = [math.nan if m["per_class_ap"][c] is None else 100 * m["per_class_ap"][c]
                  for c in classes]
            ax.barh(np.arange(len(classes)) + k * height, ap, height,
                    label=f"{name} (mAP {100 * m['mean_average_precision']:.1f}%)")
        if metrics.get("chance") is not None:  # random scores: each class's AP is its share
            ax.plot([], [], " ", label=f"chance: mAP {100 * metrics['chance']:.1f}%")
        ax.set_yticks(np.arange(len(classes)) + 0.4 - height / 2, classes, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlim=(0, 100), xlabel="average precision (%)",
               title=f"zero-shot average precision per class ({metrics.get('n_images', 'the')} "
               f"test images)")
        ax.legend(fontsize=8)
        return figure
    figure, axes = C.new_figure(9, 5, ncols=len(zeroshot), sharey=True)
    for ax, (name, m) in zip(axes, zeroshot.items()):
        counts = np.array(m["confusion_matrix"]["counts"])
        classes = m["confusion_matrix"]["classes"]
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(counts if len(classes) <= 12 else []):
            ax.text(j, i, count, ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_title(f"{name}, zero-shot: top-1 {100 * m['acc1']:.1f}%\nof {counts.sum()} images "
                     f"(chance {100 / len(classes):.0f}%)", fontsize=10)
    axes[0].set_ylabel("true class (test split)")
    figure.colorbar(image, ax=list(axes), shrink=0.7, label="fraction of the true class's images")
    return figure


def plot_summary(path, models, settings, values):
    """--summary-plot FILE: a group of bars per setting, a bar per model."""
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


def pictures(folder):
    """The pictures of an evaluation: {file name: function drawing it}."""
    zeroshot = C.read_json(os.path.join(folder, "metrics.json"))["metrics"]["zeroshot"]
    drawn = {"per_class_ap.png" if "per_class_ap" in zeroshot["clip_rgb"] else "confusion.png":
             plot_zeroshot}
    if os.path.isfile(os.path.join(folder, "modality_gap_pca.json")):
        drawn = {"modality_gap.png": plot_modality_gap, **drawn}
    return drawn


# ============================================================================ main


def evaluate(scenes, case, dataset, probe, work, models, ckpt, args, device):
    """One data set: embedded once by each encoder, measured, reported, saved."""
    flags = {"ckpt": ckpt.path, "teacher": ckpt.teacher}  # args.json: the flags as resolved
    if ckpt.kind == "baseline":
        flags.update(model=ckpt.model, pretrained=ckpt.pretrained)
    run_args = argparse.Namespace(**{**vars(args), **flags, "data": [scenes.dataset],
                                     "root": scenes.root, "split_seed": scenes.seed,
                                     "out": work.removesuffix(".partial")})
    run_info = C.describe_run(run_args, device, STAGE)
    C.write_json(os.path.join(work, "args.json"), run_info)
    print(f"{scenes.dataset} {scenes.split} split (seed {scenes.seed}): {len(dataset)} images of "
          f"{len(scenes.classes)} classes from {scenes.root}; checkpoint: "
          f"{ckpt.path or 'un-patched ' + ckpt.model}; "
          + ", ".join(f"{encoder}: {what}" for encoder, what in case.items())
          + C.left_out_note(scenes))

    clip = models["clip"]
    head = C.zeroshot_head(clip, models["tokenizer"], scenes.classnames, scenes.templates,
                           device).cpu()
    logit_scale = clip.logit_scale.detach().float().cpu()
    rgb_scale = scenes.pixels and args.rgb_scale
    pixels = dataclasses.replace(scenes.pixels, rgb_max=rgb_scale) if rgb_scale else scenes.pixels
    encoders = {"clip_rgb": C.clip_encoder(clip, pixels, device)}
    encoders.update({f"{name}_ms": C.student_encoder(models[name], scenes.pixels, device)
                     for name in ("student", "student_init") if name in models})
    features, labels, index = C.embed(dataset, encoders, device, args.batch_size, args.workers)
    metrics = measure(features, labels, head, logit_scale, scenes.classes)
    evaluated, fit = list(metrics["zeroshot"]), {}
    if probe:
        fit = {s: C.embed(data, {n: encoders[n] for n in evaluated}, device, args.batch_size,
                          args.workers) for s, data in probe.items()}
        metrics["linear_probe"] = {n: linear_probe(fit["train"][0][n], fit["train"][1],
                                                   fit["val"][0][n], fit["val"][1], features[n],
                                                   labels) for n in evaluated}
    metrics = clean(metrics)
    warnings = warnings_of(metrics, len(labels))
    report(metrics, warnings, scenes, labels, len(dataset.skipped))

    prompts = {"classnames": list(scenes.classnames), "templates": list(scenes.templates)}
    setting = setting_of(ckpt, args.name, scenes, case, len(labels), prompts, dataset.skipped,
                         run_args.out, rgb_scale)
    embeddings = None
    if args.save_embeddings:
        logits = {n: C.zeroshot_logits(features[n], head, logit_scale) for n in evaluated}
        embeddings = {"features": features, "logits": logits, "labels": labels, "index": index,
                      "files": [scenes.files[i] for i in index.tolist()], "zeroshot_head": head,
                      "logit_scale": logit_scale}
        if probe:
            embeddings["probe"] = {s: {"features": f, "labels": y} for s, (f, y, _) in fit.items()}
    save(work, setting, {"prompts": prompts, "metrics": metrics, "warnings": warnings,
                         "skipped": dataset.skipped, "run": run_info}, features, args.results,
         embeddings)


def main(argv=None):
    return C.run_stage(run, parse_args(argv))


def run(args):
    if args.summary:
        return summary(args.summary, args.summary_format, args.summary_plot)
    if args.redraw:
        return C.redraw(args.redraw, STAGE, pictures, args.debug)
    device = C.pick_device(args.device)
    ckpt = resolve_checkpoint(args)
    records = trainings(ckpt)
    plans = [plan_split(name, root, args, ckpt, records)
             for name, root in data_specs(args, records)]
    outs = [default_out(args, ckpt, scenes, len(plans) > 1) for scenes, _, _ in plans]
    for out in outs:  # bad input is refused before anything is made
        C.check_run(out, STAGE, overwrite=args.overwrite)
    C.check_writable(args.results, "--results")
    opened = lambda scenes: C.open_images(scenes, args.cache, args.workers,
                                          args.skip_bad_files)
    datasets = [opened(scenes) for scenes, _, _ in plans]
    probes = [{s: opened(part) for s, part in probe.items()} if probe else None
              for _, _, probe in plans]
    torch.manual_seed(0)  # only --pretrained none draws (the weights)
    models = load_models(ckpt, device)
    done = []
    for (scenes, case, _), dataset, probe, out in zip(plans, datasets, probes, outs):
        try:
            with C.run_folder(out, STAGE, overwrite=args.overwrite) as work:
                evaluate(scenes, case, dataset, probe, work, models, ckpt, args, device)
            done.append(scenes.dataset)
            print(f"\nwrote {out}/metrics.json; appended to {args.results}")
            if not args.no_plots:
                C.draw_pictures(out, pictures(out), args.debug)
            print()
        except (C.UserError, KeyboardInterrupt) as e:  # the finished data sets stay
            rest = plans[len(done):]
            go_on = " ".join(f"{s.dataset}={s.root}" for s, _, _ in rest) + (
                f" --out {outs[len(done)]}" if args.out and len(plans) > 1 and len(rest) == 1
                else "")
            note = f"finished before it: {', '.join(done)}; go on with --data {go_on}" if rest \
                else f"every data set finished ({', '.join(done)})"
            if not done:
                note = f"{out} was not written; run the same command again"
            raise type(e)(f"{e}; {note}" if str(e) else note) from None


if __name__ == "__main__":
    main()
