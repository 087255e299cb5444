"""Stage 3's linear probe (--linear-probe): the fit against hand-computed optima and gradients (and
scikit-learn's LogisticRegression where it is installed), the sweep of C on synthetic features, the
--summary columns, and the CLI end to end on the tiny CLIP and a student."""
import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, TINY_STUDENT, hash_split, load_stage, make_eurosat_ms

E = load_stage("03_eval.py")


def blobs(n, k=4, d=16, spread=0.5, seed=0):
    """n points around k random centres in d dimensions, labelled by their centre (row i: class i % k)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return centres[y] + spread * torch.randn(n, d, generator=g, dtype=torch.float64), y


def hand_gradient(x, y, w, b, c):
    """The gradient of mean_i loss_i + ||W||^2 / (2 c N), written out: (X^T (P - Y) / N + W / (c N),
    mean_i (P - Y)), P the softmax (class ids) or the sigmoid (0/1 targets) of X W + b."""
    z = x @ w + b
    if y.ndim == 2:
        p, t = torch.sigmoid(z), y.double()
    else:
        p, t = torch.softmax(z, dim=1), F.one_hot(y, w.shape[1]).double()
    return x.T @ (p - t) / len(x) + w / (c * len(x)), (p - t).mean(dim=0)


# ============================================================================ the fit


@pytest.mark.parametrize("multilabel", [False, True])
def test_fit_is_a_stationary_point_of_the_objective(multilabel):
    x, y = blobs(60, d=8)
    if multilabel:  # three overlapping binary targets: no class is separable
        y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0.3, torch.arange(60) % 3 == 0], dim=1).to(torch.uint8)
    for c in (0.1, 10.0):
        w, b, converged = E.fit_logistic(x, y, c, y.shape[1] if multilabel else 4)
        grad_w, grad_b = hand_gradient(x, y, w, b, c)
        assert converged and grad_w.abs().max() < 1e-6 and grad_b.abs().max() < 1e-6
        assert w.abs().max() > 1e-3  # not the trivial start


def test_fit_on_constant_features_gives_the_class_frequencies():
    """Closed form: with x = 0 the data cannot move W, the penalty keeps it 0, and the unpenalised bias
    alone fits the training frequencies: softmax(b) = class frequencies, sigmoid(b_k) = positive rate."""
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    w, b, _ = E.fit_logistic(torch.zeros(6, 3), y, 1.0, 3)
    assert w.abs().max() == 0
    torch.testing.assert_close(torch.softmax(b, dim=0), torch.tensor([0.5, 1 / 6, 1 / 3], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    targets = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0]])
    w, b, _ = E.fit_logistic(torch.zeros(4, 3), targets, 1.0, 2)
    torch.testing.assert_close(torch.sigmoid(b), torch.tensor([0.75, 0.25], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("multilabel", [False, True])
def test_fit_equals_sklearns_logistic_regression(multilabel):
    """sklearn's LogisticRegression(C) minimises C * sum_i loss_i + ||W||^2 / 2 (multinomial for class
    ids; one binary probe per column for 0/1 targets): the same optimum, hence the same probabilities
    (to the stopping rules: |gradient| <= 1e-7 here, about 2e-8 for sklearn with tol=1e-10)."""
    linear_model = pytest.importorskip("sklearn.linear_model", reason="scikit-learn is not a dependency")
    x, y = blobs(80, d=8, spread=1.5)
    if multilabel:
        y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0.3, torch.arange(80) % 3 == 0], dim=1).to(torch.uint8)
    for c in (0.1, 3.0):
        w, b, converged = E.fit_logistic(x, y, c, y.shape[1] if multilabel else 4)
        assert converged
        ours = torch.sigmoid(x @ w + b) if multilabel else torch.softmax(x @ w + b, dim=1)
        fit = lambda t: linear_model.LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x, t)  # noqa: E731
        theirs = torch.stack([torch.from_numpy(fit(y[:, k]).predict_proba(x)[:, 1]) for k in range(y.shape[1])],
                             dim=1) if multilabel else torch.from_numpy(fit(y).predict_proba(x))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # measured: up to 4e-6


# ============================================================================ the sweep of C


def test_probe_on_separable_features_picks_a_working_c():
    x, _ = blobs(400, k=5, d=16, spread=0.6)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2, 3, 4])[torch.arange(400) % 10]  # class 0 is 60% of every split
    x = x + 3 * F.one_hot(y, 16)  # separable by class
    train, val, test = slice(0, 250), slice(250, 300), slice(300, 400)
    result = E.linear_probe(x[train], y[train], x[val], y[val], x[test], y[test])
    scores = dict((c, s) for c, s in result["val_scores"])
    assert list(scores) == list(E.PROBE_CS) and result["n_train"] == 250 and result["n_val"] == 50
    assert result["acc1"] >= 0.95 and result["val_score"] == max(scores.values()) == scores[result["C"]]
    assert result["C"] == min(c for c, s in scores.items() if s == result["val_score"])  # the smaller C on ties
    # the strongest penalty leaves W ~ 0 beside the unpenalised bias: every image gets the most frequent class
    assert scores[1e-6] == pytest.approx(0.6) and result["C"] > 1e-6


def test_probe_of_multilabel_targets_is_mean_average_precision():
    x, _ = blobs(300, k=3, d=12, spread=1.0)
    y = torch.stack([x[:, 0] > 0, x[:, 1] > 0.5, x[:, 2] - x[:, 3] > 0], dim=1).to(torch.uint8)
    result = E.linear_probe(x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:], cs=(1e-6, 1.0, 100.0))
    assert "acc1" not in result and result["mean_average_precision"] >= 0.9 and result["C"] > 1e-6


def test_summary_shows_probe_columns_with_their_own_gain():
    row = {"ckpt_kind": "baseline", "ckpt": None, "teacher": None, "data": "eurosat_ms", "split": "test",
           "n_images": 100, "model": "ViT-B-32", "pretrained": "openai"}
    lines = [{**row, "prompts_sha256": "p1", "zeroshot/clip_rgb/acc1": 0.4, "linear_probe/clip_rgb/acc1": 0.8},
             {**row, "prompts_sha256": "p2", "ckpt_kind": "patched", "ckpt": "/r/p",  # other prompts: same probe column
              "zeroshot/clip_rgb/acc1": 0.6, "linear_probe/clip_rgb/acc1": 0.9}]
    text = E.summary_table(*E.summary_rows(lines))
    header = text.splitlines()[0]
    assert header == ("| model | eurosat_ms test, 100 images [prompts p1] | eurosat_ms test, 100 images [prompts p2] "
                      "| eurosat_ms test linear probe, 100 images |")
    assert "| CLIP ViT-B-32 (openai) | 40.00 |  | 80.00 |" in text
    assert "| patched CLIP /r/p |  | 60.00 | 90.00 (+10.00) |" in text


# ============================================================================ the CLI end to end


@pytest.fixture(scope="module")
def student(patched_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_align") / "run"
    load_stage("02_align_s2.py").main(["--teacher", patched_run["ckpt"], "--root", patched_run["root"], *TINY_STUDENT,
                                       "--epochs", "1", "--batch-size", "16", "--workers", "0", "--out", str(out)])
    return str(out / "student.pt")


def test_cli_linear_probe_writes_metrics_log_line_and_summary(patched_run, student, tmp_path, capsys, monkeypatch):
    cs = (0.1, 10.0, 1000.0)  # a short sweep keeps this quick; the default one is tested above
    monkeypatch.setattr(E, "linear_probe", functools.partial(E.linear_probe, cs=cs))
    out, results = tmp_path / "eval", tmp_path / "results.jsonl"
    E.main(["--ckpt", student, "--root", patched_run["root"], "--linear-probe", "--workers", "0", "--no-plots",
            "--out", str(out), "--results", str(results)])
    printed = capsys.readouterr().out
    metrics = json.load(open(out / "metrics.json"))
    (row,) = [json.loads(line) for line in open(results)]
    probe = metrics["metrics"]["linear_probe"]
    assert set(probe) == {"clip_rgb", "student_ms"}  # not the untrained student
    ids = sorted(os.path.splitext(os.path.relpath(os.path.join(d, f), patched_run["root"]))[0]
                 for d, _, files in os.walk(patched_run["root"]) for f in files)
    splits = hash_split(ids, metrics["split_seed"])  # the train and val splits of the evaluated split's seed
    for name, result in probe.items():
        assert result["n_train"] == splits.count("train") and result["n_val"] == splits.count("val")
        assert 0 <= result["acc1"] <= 1 and result["C"] in cs and [c for c, _ in result["val_scores"]] == list(cs)
        for key in ("acc1", "C", "val_score", "converged", "n_train"):
            assert row[f"linear_probe/{name}/{key}"] == result[key]
    assert "linear probe: logistic regression on" in printed
    E.main(["--summary", str(results)])
    printed = capsys.readouterr().out
    header = printed.splitlines()[0]
    assert f"eurosat_ms test linear probe, {metrics['n_images']} images" in header
    assert f"{100 * probe['student_ms']['acc1']:.2f}" in printed and "--linear-probe" in printed


def test_cli_linear_probe_refuses_other_splits_and_an_empty_val_split(tmp_path, capsys):
    root = make_eurosat_ms(tmp_path / "ms", per_class=2, size=32)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", TINY_CLIP, "--pretrained", "none", "--root", root, "--data", "eurosat_ms",
                "--linear-probe", "--split", "val"])
    assert e.value.code == 2 and "drop --split val" in capsys.readouterr().err
    files = sorted(os.path.join(c, f) for c in os.listdir(root) for f in os.listdir(os.path.join(root, c)))
    for f, split in zip(files, hash_split([os.path.splitext(f)[0] for f in files], 0)):
        if split == "val":
            os.remove(os.path.join(root, f))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", TINY_CLIP, "--pretrained", "none", "--root", root, "--data", "eurosat_ms", "--linear-probe",
                "--workers", "0", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "the val split" in err and "is empty" in err and "drop --linear-probe" in err
    assert not os.path.exists(tmp_path / "eval")  # refused before anything is written
