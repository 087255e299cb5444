"""Transfer: the paper's table from a results log (--summary), the loss ablation (--mse-weight),
the official recall cut-offs."""
import csv
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import load_stage

import common as C

align = load_stage("02_align_s2.py")
evaluate = load_stage("03_eval.py")


def line(kind, data, value, ckpt=None, teacher=None, split="test", n=100, prompts="p1", model="ViT-B-32",
         pretrained="openai", metric="acc1", student=None):
    row = {"ckpt_kind": kind, "ckpt": ckpt, "teacher": teacher, "data": data, "split": split, "n_images": n,
           "prompts_sha256": prompts, "model": model, "pretrained": pretrained,
           f"zeroshot/clip_rgb/{metric}": value}
    if student is not None:
        row[f"zeroshot/student_ms/{metric}"] = student
    return row


KNOWN = [
    line("baseline", "eurosat_ms", 0.40),
    line("baseline", "bigearthnet19", 0.20, metric="mean_average_precision"),
    line("patched", "eurosat_ms", 0.70, ckpt="/r/patch", model="ViT-B-32-quickgelu"),
    line("student", "eurosat_ms", 0.71, ckpt="/r/align/student.pt", teacher="/r/patch", student=0.65,
         model="ViT-B-32-quickgelu"),
    line("student", "bigearthnet19", 0.50, ckpt="/r/align/student.pt", teacher="/r/patch", student=0.45,
         model="ViT-B-32-quickgelu", metric="mean_average_precision"),
]


def test_summary_of_known_lines_is_the_known_table():
    table = evaluate.summary_rows(KNOWN)
    eurosat, ben = ("eurosat_ms", "test", 100, "p1"), ("bigearthnet19", "test", 100, "p1")
    assert table[("baseline", "ViT-B-32", "openai")] == {eurosat: (40.0, None), ben: (20.0, None)}
    patched = table[("patched", "/r/patch")]  # the later line (the student's teacher) wins: 71, not 70
    assert patched[eurosat] == pytest.approx((71.0, 31.0)) and patched[ben] == pytest.approx((50.0, 30.0))
    student = table[("student", "/r/align/student.pt")]
    assert student[eurosat] == pytest.approx((65.0, 25.0)) and student[ben] == pytest.approx((45.0, 25.0))
    text = evaluate.summary_table(table)
    assert text.splitlines()[0] == "| model | bigearthnet19 test | eurosat_ms test |"
    assert "| CLIP ViT-B-32 (openai) | 20.00 | 40.00 |" in text
    assert "| student /r/align/student.pt | 45.00 (+25.00) | 65.00 (+25.00) |" in text
    rows = list(csv.reader(io.StringIO(evaluate.summary_table(table, "csv"))))
    assert rows[0] == ["model", "bigearthnet19 test", "eurosat_ms test"] and len(rows) == 4


def test_summary_keeps_other_prompts_and_other_splits_apart():
    lines = [line("baseline", "eurosat_ms", 0.40), line("patched", "eurosat_ms", 0.60, ckpt="/r/p", prompts="p2"),
             line("patched", "eurosat_ms", 0.50, ckpt="/r/p", split="all", n=200)]
    text = evaluate.summary_table(evaluate.summary_rows(lines))
    header = text.splitlines()[0]
    assert "eurosat_ms test [prompts p1]" in header and "eurosat_ms test [prompts p2]" in header
    assert "eurosat_ms all" in header
    # no gain against a baseline that saw other prompts: the cell stands alone
    assert " 60.00 |" in text and "(+20.00)" not in text


def test_summary_cli_prints_markdown_and_refuses_a_missing_log(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    for row in KNOWN:
        C.append_jsonl(str(path), row)
    evaluate.main(["--summary", str(path)])
    out = capsys.readouterr().out
    assert out.startswith("| model |") and "gain over the un-patched CLIP" in out
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--summary", str(tmp_path / "none.jsonl")])
    assert e.value.code == 2 and "03_eval.py" in capsys.readouterr().err


def test_loss_ablation_weights():
    torch.manual_seed(0)
    s, t, head = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(8, 3), dim=0)
    y, scale = torch.tensor([0, 1, 2, 0]), torch.tensor(2.0)
    both, mse, ce = align.alignment_loss(s, t, head, scale, y, 0.05, 1.0)
    mse_only, _, _ = align.alignment_loss(s, t, head, scale, y, 0.0, 1.0)
    ce_only, _, _ = align.alignment_loss(s, t, head, scale, y, 0.05, 0.0)
    assert mse_only == pytest.approx(F.mse_loss(s, t).item())
    assert ce_only == pytest.approx(0.05 * F.cross_entropy(scale.exp() * F.normalize(s, dim=-1) @ head, y).item())
    assert both == pytest.approx(mse_only + ce_only)


def test_recall_at_the_official_cut_offs():
    import numpy as np
    torch.manual_seed(0)
    rgb = torch.randn(80, 16)
    ms = rgb + 2.0 * torch.randn(80, 16)
    metrics = evaluate.cross_modal(ms, rgb)
    assert list(metrics["ms_to_rgb"]) == ["recall@1", "recall@5", "recall@10", "recall@20", "recall@50"]
    a, b = ms.numpy() / np.linalg.norm(ms.numpy(), axis=1, keepdims=True), rgb.numpy() / np.linalg.norm(
        rgb.numpy(), axis=1, keepdims=True)
    sims = a @ b.T
    ranks = (sims > np.diag(sims)[:, None]).sum(1)  # no ties in random data
    for k in (1, 5, 10, 20, 50):
        assert metrics["ms_to_rgb"][f"recall@{k}"] == pytest.approx(np.mean(ranks < k))
    assert 0 < metrics["ms_to_rgb"]["recall@1"] < metrics["ms_to_rgb"]["recall@50"] < 1
