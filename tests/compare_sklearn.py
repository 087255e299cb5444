"""Stage 3's metrics against independent implementations (a script; pytest does not collect it).

    python 03_eval.py --ckpt runs/smoke/align \\
        --out runs/smoke/eval-sk --save-embeddings
    pip install scikit-learn   # not a dependency of the project
    python tests/compare_sklearn.py runs/smoke/eval-sk

Recomputes, from the saved embeddings, top-1/top-5 accuracy and balanced accuracy with sklearn,
text -> image mAP with sklearn's average_precision_score, and MS <-> RGB recall@k with a plain
numpy ranking, and prints them beside the values in metrics.json. For multi-label data (BigEarthNet)
the zero-shot mean average precision and the text -> image mAP, each with sklearn's
average_precision_score per class, averaged over the classes with at least one positive.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

try:
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, top_k_accuracy_score
except ImportError:
    sys.exit("this check needs scikit-learn: pip install scikit-learn")


def recall_at(sim, k):
    """Fraction of rows whose diagonal entry is among the k largest (numpy's argsort)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    rank = np.argmax(order == np.arange(len(sim))[:, None], axis=1)
    return float((rank < k).mean())


def main(folder):
    saved = torch.load(os.path.join(folder, "embeddings.pt"), weights_only=True)
    metrics = json.load(open(os.path.join(folder, "metrics.json")))["metrics"]
    y = saved["labels"].numpy()
    n_classes = saved["zeroshot_head"].shape[1]
    multilabel = y.ndim == 2
    targets = y if multilabel else np.eye(n_classes)[y]
    present = [c for c in range(n_classes) if targets[:, c].any()]
    mean_ap = lambda scores: np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in present])
    rows = []
    for name, features in saved["features"].items():
        if name not in metrics["zeroshot"]:
            continue  # the untrained student is only used for the modality gap
        logits = saved["logits"][name].numpy()
        zs = metrics["zeroshot"][name]
        scores = (F.normalize(features.float(), dim=-1) @ saved["zeroshot_head"]).numpy()
        rows.append((f"{name} text->image mAP", metrics["text_to_image"][name]["mean_average_precision"],
                     mean_ap(scores)))
        if multilabel:
            rows.append((f"{name} zero-shot mAP", zs["mean_average_precision"], mean_ap(logits)))
            continue
        rows += [(f"{name} acc1", zs["acc1"], top_k_accuracy_score(y, logits, k=1, labels=range(n_classes))),
                 (f"{name} acc5", zs["acc5"], top_k_accuracy_score(y, logits, k=5, labels=range(n_classes))),
                 (f"{name} mean_per_class_recall", zs["mean_per_class_recall"],
                  balanced_accuracy_score(y, logits.argmax(1)))]
    if "cross_modal" in metrics:
        ms = F.normalize(saved["features"]["student_ms"].double(), dim=-1)
        rgb = F.normalize(saved["features"]["clip_rgb"].double(), dim=-1)
        sim = (ms @ rgb.T).numpy()
        for direction, s in (("ms_to_rgb", sim), ("rgb_to_ms", sim.T)):
            rows += [(f"{direction} recall@{k}", metrics["cross_modal"][direction][f"recall@{k}"], recall_at(s, k))
                     for k in (1, 5, 10)]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'03_eval.py':>10}  {'independent':>11}  {'|diff|':>8}")
    for label, ours, theirs in rows:
        print(f"{label:<{width}}  {ours:10.6f}  {theirs:11.6f}  {abs(ours - theirs):8.1e}")
    worst = max(abs(ours - theirs) for _, ours, theirs in rows)
    print(f"largest difference: {worst:.1e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
