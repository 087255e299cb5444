"""Pictures: each stage draws its PNGs from the JSON it wrote (they open, at their fixed size, and
each stage's --redraw OUT draws them again from the JSON alone); the PCA behind modality_gap.png
against numpy's SVD; the confusion matrix against a hand count; every stage finishes with one line
when matplotlib is missing; a picture that fails to draw costs one line, never the run; --no-plots
draws nothing."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_STUDENT, load_stage, tiny_patch_args

import common as C

patch, align, evaluate = (load_stage(f) for f in ("01_patch_clip.py", "02_align_s2.py", "03_eval.py"))
PCA_JSON = "modality_gap_pca.json"
JSON_FILES = ("metrics.json", "args.json", PCA_JSON)
PIXELS = {"alpha.png": (800, 380), "training.png": (900, 300), "modality_gap.png": (900, 460),  # 100 dpi
          "confusion.png": (900, 500), "per_class_ap.png": (900, 600), "summary.png": (800, 400)}


def align_args(teacher, root, out, *extra, epochs=3):
    return ["--teacher", str(teacher), "--root", str(root), *TINY_STUDENT, "--epochs", str(epochs),
            "--batch-size", "16", "--lr", "1e-3", "--workers", "0", "--out", str(out), *extra]


def eval_args(ckpt, root, out, *extra):
    return ["--ckpt", str(ckpt), "--root", str(root), "--workers", "0", "--out", str(out),
            "--results", str(os.path.join(os.path.dirname(out), "results.jsonl")), *extra]


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def assert_picture(path):
    """The PNG opens and has the pixel size its figure was made with."""
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == "PNG"
        size = image.size
        image.verify()
    assert size == PIXELS[os.path.basename(path)], (path, size)


def plot_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("plots:")]


@pytest.fixture(scope="module")
def runs(patched_run, tmp_path_factory):
    """The session's stage-1 run, a stage-2 run aligned to it and stage 3 on that student (embeddings
    saved), all drawing their pictures."""
    base = tmp_path_factory.mktemp("plots")
    align.main(align_args(patched_run["ckpt"], patched_run["root"], base / "align"))
    evaluate.main(eval_args(base / "align" / "student.pt", patched_run["root"], base / "eval", "--save-embeddings"))
    return {"patch": patched_run["out"], "align": str(base / "align"), "eval": str(base / "eval"),
            "root": patched_run["root"]}


def test_each_stage_draws_its_pictures_and_they_redraw_from_the_json_alone(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib (pip install matplotlib)")
    expected = {"patch": ["alpha.png"], "align": ["training.png"], "eval": ["confusion.png", "modality_gap.png"]}
    stages = {"patch": patch, "align": align, "eval": evaluate}
    capsys.readouterr()
    for stage, names in expected.items():
        assert pngs(runs[stage]) == names
        for name in names:
            assert_picture(os.path.join(runs[stage], name))
        copy = tmp_path / stage  # only the JSON files: the pictures are drawn from them and nothing else
        os.makedirs(copy)
        for f in JSON_FILES:
            if os.path.exists(os.path.join(runs[stage], f)):
                shutil.copy(os.path.join(runs[stage], f), copy)
        stages[stage].main(["--redraw", str(copy)])
        assert sorted(plot_lines(capsys)) == [f"plots: wrote {copy / name}" for name in names]
        assert pngs(copy) == names
        for name in names:
            assert_picture(copy / name)


def numpy_pca(x):
    """An independent PCA: numpy's SVD of the centred rows, each component's sign chosen so that
    its largest-magnitude loading is positive (the convention evaluate.modality_gap_pca states)."""
    centred = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(vt[[0, 1], np.abs(vt[:2]).argmax(axis=1)])
    return u[:, :2] * s[:2] * signs, s[:2] ** 2 / (s ** 2).sum()


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_modality_gap_coordinates_are_numpys_svd_of_the_saved_embeddings(runs):
    pca = json.load(open(os.path.join(runs["eval"], PCA_JSON)))
    saved = torch.load(os.path.join(runs["eval"], "embeddings.pt"), weights_only=True)
    features = {k: v.numpy() for k, v in saved["features"].items()}
    n = len(features["clip_rgb"])
    assert pca["index"] == list(range(n)) and pca["n_scenes"] == n  # fewer than 2000 scenes: all of them
    for when, student in (("before", "student_init_ms"), ("after", "student_ms")):
        coords, ratio = numpy_pca(np.concatenate([unit(features["clip_rgb"]), unit(features[student])]))
        np.testing.assert_allclose(np.concatenate([pca[when]["rgb"], pca[when]["ms"]]), coords, atol=1e-6)
        np.testing.assert_allclose(pca[when]["explained_variance_ratio"], ratio, rtol=1e-9)


def test_modality_gap_pca_caps_the_scenes_evenly_and_needs_a_student():
    g = torch.Generator().manual_seed(0)
    features = {"clip_rgb": torch.randn(50, 8, generator=g), "student_ms": torch.randn(50, 8, generator=g) + 2}
    data = evaluate.modality_gap_pca(features, max_scenes=7)
    assert data["index"] == [0, 8, 16, 24, 33, 41, 49] and data["n_scenes"] == 50 and "before" not in data
    rows = data["index"]
    coords, ratio = numpy_pca(np.concatenate([unit(features["clip_rgb"][rows]), unit(features["student_ms"][rows])]))
    np.testing.assert_allclose(np.concatenate([data["after"]["rgb"], data["after"]["ms"]]), coords, atol=1e-6)
    np.testing.assert_allclose(data["after"]["explained_variance_ratio"], ratio, rtol=1e-9)
    assert set(evaluate.modality_gap_pca({"clip_rgb": features["clip_rgb"]})) == {"index", "n_scenes"}  # no panel


def test_confusion_matrix_is_a_hand_count_and_stays_out_of_the_results_log(runs):
    metrics = json.load(open(os.path.join(runs["eval"], "metrics.json")))
    saved = torch.load(os.path.join(runs["eval"], "embeddings.pt"), weights_only=True)
    labels = saved["labels"].numpy()
    for name in ("clip_rgb", "student_ms"):
        zeroshot = metrics["metrics"]["zeroshot"][name]
        matrix = zeroshot["confusion_matrix"]
        by_hand = np.zeros((len(matrix["classes"]),) * 2, dtype=int)
        np.add.at(by_hand, (labels, saved["logits"][name].numpy().argmax(axis=1)), 1)
        assert np.array_equal(matrix["counts"], by_hand)
        recall = [np.nan if r is None else r for r in map(zeroshot["per_class"].get, matrix["classes"])]
        with np.errstate(invalid="ignore"):  # a class without test images: 0/0, as per_class's None
            np.testing.assert_allclose(np.diag(by_hand) / by_hand.sum(axis=1), recall)
    row = [json.loads(line) for line in open(os.path.join(os.path.dirname(runs["eval"]), "results.jsonl"))][-1]
    assert not any("confusion" in key for key in row) and "zeroshot/student_ms/acc1" in row


def test_per_class_ap_bars_of_multilabel_results_from_a_metrics_json(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib (pip install matplotlib)")
    classes = C.bigearthnet_nomenclature()["labels19"]  # long names, drawn whole, in this order
    aps = {c: (i % 7) / 7 for i, c in enumerate(classes)}
    aps[classes[3]] = None  # a class without positive test images: no bar
    zeroshot = {name: {"mean_average_precision": 0.4, "per_class_ap": aps} for name in ("clip_rgb", "student_ms")}
    C.write_json(str(tmp_path / "metrics.json"), {"metrics": {"zeroshot": zeroshot}, "classes": classes})
    C.write_json(str(tmp_path / "args.json"), {"stage": "03_eval.py"})  # as every run folder has
    evaluate.main(["--redraw", str(tmp_path)])
    assert plot_lines(capsys) == [f"plots: wrote {tmp_path / 'per_class_ap.png'}"]
    assert pngs(tmp_path) == ["per_class_ap.png"]
    assert_picture(tmp_path / "per_class_ap.png")


def test_without_matplotlib_every_stage_finishes_and_says_so_in_one_line(patched_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    root = patched_run["root"]
    patch.main(tiny_patch_args(root, tmp_path / "patch", "eurosat_ms", "--epochs", "1", "--alphas", "0", "1"))
    lines = {"patch": plot_lines(capsys)}
    align.main(align_args(tmp_path / "patch", root, tmp_path / "align", epochs=1))
    lines["align"] = plot_lines(capsys)
    evaluate.main(eval_args(tmp_path / "align" / "student.pt", root, tmp_path / "eval"))
    lines["eval"] = plot_lines(capsys)
    for stage, names in (("patch", "alpha.png"), ("align", "training.png"), ("eval", "modality_gap.png, confusion.png")):
        assert lines[stage] == [f"plots: matplotlib is not installed; pip install matplotlib to get {names} "
                                f"(or pass --no-plots)"], lines[stage]
        assert os.path.isfile(tmp_path / stage / "metrics.json") and pngs(tmp_path / stage) == []
    assert os.path.isfile(tmp_path / "patch" / "patched.json") and os.path.isfile(tmp_path / "align" / "student.pt")
    assert os.path.isfile(tmp_path / "eval" / PCA_JSON)  # the numbers of the picture are there to draw it later


def test_no_plots_draws_nothing_and_removes_an_earlier_runs_pictures(runs, tmp_path, capsys):
    for stage in ("patch", "align", "eval"):  # finished runs, with their pictures where matplotlib is installed
        shutil.copytree(runs[stage], tmp_path / stage)
    patch.main(tiny_patch_args(runs["root"], tmp_path / "patch", "eurosat_ms", "--overwrite", "--no-plots"))
    align.main(align_args(runs["patch"], runs["root"], tmp_path / "align", "--overwrite", "--no-plots"))
    evaluate.main(eval_args(runs["align"] + "/student.pt", runs["root"], tmp_path / "eval", "--overwrite", "--no-plots"))
    assert plot_lines(capsys) == []
    for stage in ("patch", "align", "eval"):
        assert pngs(tmp_path / stage) == [] and os.path.isfile(tmp_path / stage / "metrics.json")
    assert os.path.isfile(tmp_path / "eval" / PCA_JSON)  # the numbers of the picture are written all the same


def test_a_picture_that_fails_costs_one_line_never_the_run(runs, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib (pip install matplotlib)")
    out = tmp_path / "eval"
    shutil.copytree(runs["eval"], out)
    before = open(out / "metrics.json").read()
    capsys.readouterr()

    def fails(folder):
        raise ValueError("a bug in a drawing function")
    monkeypatch.setattr(evaluate, "plot_zeroshot", fails)
    evaluate.main(["--redraw", str(out)])
    assert plot_lines(capsys) == [f"plots: wrote {out / 'modality_gap.png'}", "plots: could not draw confusion.png "
                                  "(ValueError: a bug in a drawing function); the run is saved"]
    assert open(out / "metrics.json").read() == before
    with pytest.raises(ValueError):  # --debug shows the traceback
        evaluate.main(["--redraw", str(out), "--debug"])
    capsys.readouterr()

    def stopped(folder):
        raise KeyboardInterrupt()
    monkeypatch.setattr(evaluate, "plot_zeroshot", stopped)
    with pytest.raises(SystemExit) as e:  # a stop is a stop, not a failed picture
        evaluate.main(["--redraw", str(out)])
    captured = capsys.readouterr()
    assert e.value.code == 130 and captured.err.strip().splitlines()[-1].startswith("stopped:")
    assert "could not draw" not in captured.out and open(out / "metrics.json").read() == before


def test_summary_plot_draws_the_table_as_grouped_bars(tmp_path, capsys, monkeypatch):
    log, png = str(tmp_path / "results.jsonl"), str(tmp_path / "summary.png")
    for kind, ckpt, value in (("baseline", None, 0.4), ("patched", "/r/patch", 0.7)):
        evaluate.append_jsonl(log, {"ckpt_kind": kind, "ckpt": ckpt, "teacher": None, "data": "eurosat_ms",
                                    "split": "test", "n_images": 100, "prompts_sha256": "p", "model": "ViT-B-32",
                                    "pretrained": "openai", "zeroshot/clip_rgb/acc1": value})
    with pytest.raises(SystemExit) as e:  # the flag belongs to --summary
        evaluate.main(["--summary-plot", png])
    assert e.value.code == 2 and "--summary" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(SystemExit) as e:  # asked for by name: an error before anything is printed
            evaluate.main(["--summary", log, "--summary-plot", png])
        assert e.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib (pip install matplotlib)")
    evaluate.main(["--summary", log, "--summary-plot", png])
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {png}"
    assert_picture(png)
