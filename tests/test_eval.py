"""Stage 3: the metrics on hand-made embeddings with known answers, zero-shot logits against
open_clip's own encoders and preprocessing, the CLI end to end on a patched CLIP, the un-patched
baseline and a student, and one clear line with exit code 2 for bad input."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

import common as C
from conftest import TINY_CLIP, TINY_STUDENT, load_stage, make_eurosat_ms, split_count

E = load_stage("03_eval.py")


def cli(tmp_path, *flags):
    """Run stage 3 in-process; returns (metrics.json, the results log's rows)."""
    out, results = tmp_path / "eval", tmp_path / "results.jsonl"
    E.main([*flags, "--workers", "0", "--out", str(out), "--results", str(results)])
    return json.load(open(out / "metrics.json")), [json.loads(line) for line in open(results)]


def expect_user_error(capsys, argv, *phrases):
    with pytest.raises(SystemExit) as exit_info:
        E.main([*argv, "--workers", "0"])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # a session fixture's progress bars may come before it
    assert exit_info.value.code == 2
    assert line.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in line, line


# ============================================================================ metrics on known answers


def test_recall_at_k_perfect_reversed_and_ties():
    eye = torch.eye(4)
    perfect = E.true_match_ranks(eye, eye)
    assert perfect.tolist() == [0, 0, 0, 0] and E.recall_at_k(perfect, 1) == 1.0
    # gallery item i is the antipode of query i, so each true match scores lowest of all
    angles = torch.tensor([0.0, 0.3, 0.6, 0.9])
    queries = torch.stack([angles.cos(), angles.sin()], dim=1)
    worst = E.true_match_ranks(queries, -queries)
    assert worst.tolist() == [3, 3, 3, 3]
    assert E.recall_at_k(worst, 3) == 0.0 and E.recall_at_k(worst, 4) == 1.0 and E.recall_at_k(worst, 10) == 1.0
    # ties with the true match count against it: gallery 0 and 1 are identical
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ranks = E.true_match_ranks(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), gallery)
    assert ranks.tolist() == [1, 1, 0]
    assert E.recall_at_k(ranks, 1) == pytest.approx(1 / 3) and E.recall_at_k(ranks, 2) == 1.0
    all_tied = E.true_match_ranks(torch.ones(5, 3), torch.ones(5, 3))
    assert all_tied.tolist() == [4] * 5
    # random embeddings (no ties), a few rows at a time: the true match's place in a full sort
    g = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    order = (F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T).argsort(dim=1, descending=True)
    place = (order == torch.arange(50)[:, None]).int().argmax(dim=1)
    assert torch.equal(E.true_match_ranks(queries, gallery, chunk=7), place)


def test_topk_accuracy_caps_k_and_balanced_accuracy_skips_absent_classes():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 1, 0, 1])
    assert E.topk_accuracy(logits, labels, 1) == 0.25
    assert E.topk_accuracy(logits, labels, 2) == 0.5
    assert E.topk_accuracy(logits, labels, 5) == 1.0  # 3 classes: top-5 is top-3
    pred = torch.tensor([0, 0, 0, 0])
    labels = torch.tensor([0, 0, 0, 1])  # class 2 has no images
    recall = E.per_class_recall(pred, labels, 3)
    assert recall[:2].tolist() == [1.0, 0.0] and math.isnan(recall[2])
    assert E.balanced_accuracy(pred, labels, 3) == 0.5  # sklearn's balanced_accuracy_score: 0.5


def test_average_precision_against_hand_computation():
    # sklearn's documented example: AP = 1/2 * 1 + 1/2 * 2/3
    assert C.average_precision(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == \
        pytest.approx(0.8333333)
    # tied scores are one threshold: P = 2/3 at R = 1 (not 1.0 positives-first, nor 7/12 negatives-first)
    assert C.average_precision(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1, 1, 0])) == pytest.approx(2 / 3)
    # (P, R) at thresholds 0.9, 0.5, 0.1: (0, 0), (1/3, 1/2), (1/2, 1) -> 1/2 * 1/3 + 1/2 * 1/2
    assert C.average_precision(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([0, 1, 0, 1])) == \
        pytest.approx(5 / 12)
    assert math.isnan(C.average_precision(torch.tensor([0.3, 0.2]), torch.tensor([0, 0])))
    scores = torch.tensor([[0.9, 0.5, 0.5], [0.2, 0.8, 0.4], [0.7, 0.3, 0.6]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]])  # class 2 has no positives: left out
    mean_ap, aps = C.mean_average_precision(scores, targets)
    assert aps[0] == 1.0 and aps[1] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3) and math.isnan(aps[2])
    assert mean_ap == pytest.approx((1 + 0.8333333) / 2)


def test_zeroshot_metrics_of_multilabel_data_is_mean_average_precision():
    logits = torch.tensor([[0.9, 0.5, 0.5], [0.2, 0.8, 0.4], [0.7, 0.3, 0.6]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]])  # 2-D: multi-label; class c has no positives
    metrics = E.zeroshot_metrics(logits, labels, ["a", "b", "c"])
    assert metrics["mean_average_precision"] == pytest.approx((1 + 5 / 6) / 2)
    assert metrics["per_class_ap"]["b"] == pytest.approx(5 / 6) and "acc1" not in metrics


def test_precision_at_k_breaks_ties_pessimistically():
    scores, positives = torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 1])
    assert E.precision_at_k(scores, positives, 2) == 0.5  # the tied negative takes the second place
    assert E.precision_at_k(scores, positives, 3) == pytest.approx(2 / 3)
    assert E.precision_at_k(scores, positives, 10) == 0.75  # fewer than k images: the top 4


def test_text_to_image_on_known_embeddings():
    head = torch.eye(3)  # class c's query is axis c
    features = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0]]).bool()  # class 2 has no images: left out
    result = E.text_to_image(head, features, targets, ["a", "b", "c"])
    assert result["mean_average_precision"] == 1.0
    assert result["precision_at_10"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert math.isnan(result["per_class_ap"]["c"])


def test_modality_gap_of_identical_shifted_and_swapped_sets():
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    same = E.modality_gap(x, 3 * x)  # the scale is normalised away
    assert same["centroid_distance"] == pytest.approx(0, abs=1e-7) and same["true_pair_cosine"] == pytest.approx(1)
    apart = E.modality_gap(torch.tensor([[1.0, 0.0]] * 4), torch.tensor([[0.0, 1.0]] * 4))
    assert apart == pytest.approx({"centroid_distance": 2 ** 0.5, "true_pair_cosine": 0, "random_pair_cosine": 0})
    # the same centroid, but every true pair orthogonal and every other pair identical
    swapped = E.modality_gap(torch.eye(2), torch.eye(2).flip(0))
    assert swapped == pytest.approx({"centroid_distance": 0, "true_pair_cosine": 0, "random_pair_cosine": 1})
    basis = E.modality_gap(torch.eye(3), torch.eye(3))
    assert basis == pytest.approx({"centroid_distance": 0, "true_pair_cosine": 1, "random_pair_cosine": 0})


# ============================================================================ a patched CLIP, end to end


@pytest.fixture(scope="module")
def patched_eval(patched_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_patched")
    metrics, rows = cli(tmp, "--ckpt", patched_run["ckpt"], "--root", patched_run["root"], "--save-embeddings")
    saved = torch.load(tmp / "eval" / "embeddings.pt", weights_only=True)
    return {"metrics": metrics, "rows": rows, "saved": saved}


def test_zeroshot_logits_equal_open_clips_own(patched_run, patched_eval):
    import open_clip
    from PIL import Image
    saved, meta = patched_eval["saved"], json.load(open(os.path.join(patched_run["out"], "patched.json")))
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_CLIP, pretrained=os.path.join(patched_run["ckpt"], C.OPEN_CLIP_WEIGHTS))
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    model.eval()
    tifs = [tifffile.imread(os.path.join(patched_run["root"], f)) for f in saved["files"]]
    # the RGB composite as EuroSAT's RGB release: B04, B03, B02 (bands 4, 3, 2 of the tif) * 255/3558
    composites = [np.floor(np.clip(t[..., [3, 2, 1]] * (255 / 3558), 0, 255)).astype(np.uint8) for t in tifs]
    with torch.no_grad():
        head = []
        for name in meta["classnames"]:
            text = F.normalize(model.encode_text(tokenizer([t.format(name) for t in meta["templates"]])), dim=-1)
            head.append(F.normalize(text.mean(dim=0), dim=0))
        head = torch.stack(head, dim=1)
        features = model.encode_image(torch.stack([preprocess(Image.fromarray(c)) for c in composites]))
        logits = model.logit_scale.exp() * F.normalize(features, dim=-1) @ head
        # the same weights on stage 3's own input tensor: equal to float precision
        same_input = model.encode_image(C.clip_input(torch.from_numpy(np.stack(tifs)), meta["preprocess_cfg"], "cpu", pixels=C.DATA["eurosat_ms"].pixels))
    torch.testing.assert_close(saved["zeroshot_head"], head, atol=1e-5, rtol=0)
    torch.testing.assert_close(saved["features"]["clip_rgb"], same_input, atol=1e-5, rtol=1e-5)
    # PIL's uint8 resize differs from the float resize by about a grey level
    scale = model.logit_scale.exp().item()
    torch.testing.assert_close(saved["logits"]["clip_rgb"], logits, atol=0.005 * scale, rtol=0)
    assert (saved["logits"]["clip_rgb"].argmax(1) == logits.argmax(1)).float().mean() >= 0.9


def test_cli_on_patched_clip_writes_metrics_and_log_line(patched_run, patched_eval):
    metrics, rows, saved = patched_eval["metrics"], patched_eval["rows"], patched_eval["saved"]
    meta = json.load(open(os.path.join(patched_run["out"], "patched.json")))
    assert metrics["ckpt_kind"] == "patched" and metrics["data"] == "eurosat_ms" and metrics["split"] == "test"
    assert metrics["n_images"] == split_count(patched_run["root"], "test") and metrics["split_seed"] == meta["split_seed"]
    assert set(metrics["metrics"]) == {"zeroshot", "text_to_image"}  # no student: no MS, no gap
    zeroshot = metrics["metrics"]["zeroshot"]["clip_rgb"]
    labels = saved["labels"]
    assert zeroshot["acc1"] == pytest.approx((saved["logits"]["clip_rgb"].argmax(1) == labels).float().mean().item())
    assert set(zeroshot["per_class"]) == set(meta["classes"])
    assert len(rows) == 1
    row = rows[0]
    assert row["ckpt_sha256"] == meta["weights_sha256"] and row["ckpt"] == os.path.abspath(patched_run["ckpt"])
    assert row["zeroshot/clip_rgb/acc1"] == zeroshot["acc1"]
    assert row["text_to_image/clip_rgb/mean_average_precision"] == \
        metrics["metrics"]["text_to_image"]["clip_rgb"]["mean_average_precision"]
    assert row["n_images"] == metrics["n_images"] and row["root"] == os.path.abspath(patched_run["root"])


def test_cli_baseline_with_default_run_folder_and_log(patched_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    E.main(["--model", TINY_CLIP, "--pretrained", "none", "--data", "eurosat_ms", "--root", patched_run["root"],
            "--workers", "0"])
    (folder,) = os.listdir(tmp_path / "runs/eval")  # the data folder's path in the name: another is another run
    assert folder == f"{TINY_CLIP}-none-eurosat_ms-test-{C.sha256_of(os.path.realpath(patched_run['root']))[:8]}"
    metrics = json.load(open(tmp_path / "runs/eval" / folder / "metrics.json"))
    (row,) = [json.loads(line) for line in open(tmp_path / "runs/results.jsonl")]
    copy = shutil.copytree(patched_run["root"], tmp_path / "elsewhere")
    E.main(["--model", TINY_CLIP, "--pretrained", "none", "--data", "eurosat_ms", "--root", str(copy), "--workers", "0",
            "--no-plots"])  # the same model and data set from another folder: not refused, nothing replaced
    assert len(os.listdir(tmp_path / "runs/eval")) == 2
    assert metrics["ckpt"] is None and metrics["model"] == TINY_CLIP and metrics["ckpt_kind"] == "baseline"
    assert metrics["case"] == {"clip_rgb": "transfer"} and row["case/clip_rgb"] == "transfer"
    assert row["ckpt_sha256"] is None and row["pretrained"] == "none"
    assert 0 <= row["zeroshot/clip_rgb/acc1"] <= row["zeroshot/clip_rgb/acc5"] <= 1


def test_a_file_of_a_stage1_folder_is_evaluated_as_what_it_is(patched_run, patched_eval, tmp_path, capsys):
    """--ckpt OUT/finetuned.pt is the fine-tuned image tower (alpha 1), evaluated as its own model and
    recorded so (PAINT's comparison: fine-tuned vs patched), with its own default folder; a reviewer
    found it evaluated the patched CLIP under that name. --ckpt OUT/open_clip_model.safetensors, the
    patched CLIP's own weights, evaluates the patched CLIP."""
    import open_clip
    finetuned = os.path.join(patched_run["ckpt"], "finetuned.pt")
    metrics, (row,) = cli(tmp_path / "ft", "--ckpt", finetuned, "--root", patched_run["root"], "--no-plots",
                          "--save-embeddings")
    assert metrics["ckpt_kind"] == row["ckpt_kind"] == "finetuned" and metrics["ckpt"] == os.path.abspath(finetuned)
    assert row["ckpt_sha256"] == C.sha256_of(finetuned) and row["case/clip_rgb"] == "trained on"
    model = open_clip.create_model_and_transforms("local-dir:" + patched_run["ckpt"])[0].eval()
    model.visual.load_state_dict(torch.load(finetuned, weights_only=True))  # independently: the tower stage 1 saved
    saved = torch.load(tmp_path / "ft" / "eval" / "embeddings.pt", weights_only=True)
    tifs = torch.from_numpy(np.stack([tifffile.imread(os.path.join(patched_run["root"], f)) for f in saved["files"]]))
    with torch.no_grad():
        expected = model.encode_image(C.clip_input(tifs, model.visual.preprocess_cfg, "cpu",
                                                   pixels=C.DATA["eurosat_ms"].pixels))
    torch.testing.assert_close(saved["features"]["clip_rgb"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(saved["features"]["clip_rgb"], patched_eval["saved"]["features"]["clip_rgb"], atol=1e-3)
    flags = E.parse_args(["--ckpt", finetuned])
    assert E.default_out(flags, E.resolve_checkpoint(flags), C.Scenes(
        "eurosat_ms", "r", "ms", [], [], (), split="test"), False).startswith(patched_run["ckpt"] + "-finetuned-eval-eurosat_ms-test-")
    weights = os.path.join(patched_run["ckpt"], C.OPEN_CLIP_WEIGHTS)
    metrics, (row,) = cli(tmp_path, "--ckpt", weights, "--root", patched_run["root"], "--no-plots")
    assert metrics["ckpt_kind"] == row["ckpt_kind"] == "patched"
    assert metrics["ckpt_sha256"] == C.sha256_of(weights)  # the file's own hash: the weights evaluated
    # the same CLIP as the run folder's evaluation: the same numbers on the same test split
    assert metrics["metrics"] == patched_eval["metrics"]["metrics"]


def test_a_baseline_from_a_weights_file_is_named_in_the_summary(patched_run, tmp_path, capsys):
    """RemoteCLIP, SkyCLIP and GeoRSCLIP are open_clip ViT-B-32 checkpoints that users download: stage 3
    evaluates one from its file (here a checkpoint made in the test) as an un-patched CLIP, and --summary
    shows it under --name, else the file's name."""
    import open_clip
    path = tmp_path / "RemoteCLIP-tiny.pt"
    torch.manual_seed(5)
    torch.save(open_clip.create_model_and_transforms(TINY_CLIP)[0].state_dict(), path)
    flags = ["--model", TINY_CLIP, "--pretrained", str(path), "--data", "eurosat_ms", "--root", patched_run["root"],
             "--no-plots"]
    metrics, (row,) = cli(tmp_path / "a", *flags)
    assert row["ckpt_kind"] == "baseline" and row["ckpt_sha256"] == C.sha256_of(str(path))
    assert row["name"] == f"RemoteCLIP-tiny ({TINY_CLIP})"
    cli(tmp_path / "b", *flags, "--name", "RemoteCLIP")
    E.main(["--summary", str(tmp_path / "b" / "results.jsonl")])
    assert f"| RemoteCLIP ({TINY_CLIP}) |" in capsys.readouterr().out


# ============================================================================ a student, end to end


@pytest.fixture(scope="module")
def student_run(patched_run, tmp_path_factory):
    """A finished stage-2 run, student_init.pt and student.pt, aligned to stage 1's patched CLIP."""
    out = tmp_path_factory.mktemp("align") / "run"
    load_stage("02_align_s2.py").main(["--teacher", patched_run["ckpt"], "--root", patched_run["root"], *TINY_STUDENT,
                                       "--epochs", "4", "--batch-size", "16", "--lr", "1e-3", "--workers", "0",
                                       "--out", str(out)])
    return {"out": str(out), "ckpt": str(out / "student.pt")}


def test_cli_on_student_measures_both_modalities_retrieval_and_gap(patched_run, patched_eval, student_run,
                                                                    tmp_path):
    metrics, (row,) = cli(tmp_path, "--ckpt", student_run["ckpt"], "--root", patched_run["root"],
                          "--save-embeddings")
    m = metrics["metrics"]
    assert metrics["ckpt_kind"] == "student" and metrics["teacher"] == os.path.abspath(patched_run["ckpt"])
    assert set(m["zeroshot"]) == {"clip_rgb", "student_ms"} == set(m["text_to_image"])
    # the teacher on the same test split gives what the patched CLIP's own evaluation gave
    assert m["zeroshot"]["clip_rgb"] == patched_eval["metrics"]["metrics"]["zeroshot"]["clip_rgb"]
    saved = torch.load(tmp_path / "eval" / "embeddings.pt", weights_only=True)
    ms, rgb = saved["features"]["student_ms"], saved["features"]["clip_rgb"]
    sim = F.normalize(ms, dim=-1) @ F.normalize(rgb, dim=-1).T  # no ties in real embeddings: argmax = top 1
    assert m["cross_modal"]["ms_to_rgb"]["recall@1"] == pytest.approx(
        (sim.argmax(1) == torch.arange(len(sim))).float().mean().item())
    n = metrics["n_images"]  # 11 test images: recall@20 and @50 are 1 by construction,
    assert m["cross_modal"]["rgb_to_ms"]["recall@20"] == m["cross_modal"]["ms_to_rgb"]["recall@50"] == 1.0
    # said where it is printed (and in metrics.json): a cut-off at or above the images is no measurement
    assert f"{n} test images: recall@20, 50 is 1 for any model; read these as a check, not a measurement" \
        in metrics["warnings"] and n == 11
    gap = m["modality_gap"]
    assert gap["after"]["true_pair_cosine"] > gap["before"]["true_pair_cosine"]
    assert gap["after"]["centroid_distance"] < gap["before"]["centroid_distance"]
    assert row["modality_gap/before/centroid_distance"] == gap["before"]["centroid_distance"]
    assert row["cross_modal/ms_to_rgb/recall@5"] == m["cross_modal"]["ms_to_rgb"]["recall@5"]


def test_same_command_gives_the_same_metrics(patched_run, student_run, tmp_path):
    first, _ = cli(tmp_path / "a", "--ckpt", student_run["ckpt"], "--root", patched_run["root"])
    again, _ = cli(tmp_path / "b", "--ckpt", student_run["ckpt"], "--root", patched_run["root"])
    assert first["metrics"] == again["metrics"] and first["ckpt_sha256"] == again["ckpt_sha256"]


def test_cli_on_student_with_moved_teacher_and_no_init(patched_run, student_run, tmp_path):
    """--teacher finds a teacher that was moved; without student_init.pt there is no 'before' gap."""
    shutil.copytree(patched_run["out"], tmp_path / "moved")
    record = torch.load(student_run["ckpt"], weights_only=True)
    record["teacher"]["path"] = str(tmp_path / "gone")
    os.makedirs(tmp_path / "run")
    C.save_torch(str(tmp_path / "run" / "student.pt"), record)
    metrics, _ = cli(tmp_path, "--ckpt", str(tmp_path / "run"), "--root", patched_run["root"],  # the run folder
                     "--teacher", str(tmp_path / "moved"))
    assert list(metrics["metrics"]["modality_gap"]) == ["after"]
    # args.json records the checkpoint as resolved: the folder's student.pt and the teacher passed
    recorded = json.load(open(tmp_path / "eval" / "args.json"))["args"]
    assert recorded["ckpt"] == str(tmp_path / "run" / "student.pt") and recorded["teacher"] == str(tmp_path / "moved")


def test_the_checkpoint_is_resolved_without_rewriting_the_flags(patched_run, student_run):
    """resolve_checkpoint says what --ckpt is (kind, file, model, teacher); the flags stay as given."""
    meta = json.load(open(os.path.join(patched_run["out"], "patched.json")))
    finetuned = os.path.join(patched_run["ckpt"], "finetuned.pt")
    for argv, kind, path, model in [
            ([], "baseline", None, ("ViT-B-32", "openai")),
            (["--ckpt", finetuned], "finetuned", finetuned, (meta["model"], meta["pretrained"])),
            (["--ckpt", student_run["out"]], "student", student_run["ckpt"], (meta["model"], meta["pretrained"]))]:
        args = E.parse_args(argv)
        given = dict(vars(args))
        ckpt = E.resolve_checkpoint(args)
        assert vars(args) == given and (ckpt.kind, ckpt.path, (ckpt.model, ckpt.pretrained)) == (kind, path, model)
    assert os.path.samefile(ckpt.teacher, patched_run["ckpt"]) and ckpt.clip_meta == meta
    assert ckpt.record["kind"] == "rsclip-align/student"


# ============================================================================ bad input


def test_overwrite_without_save_embeddings_removes_the_earlier_embeddings(patched_run, tmp_path):
    cli(tmp_path, "--ckpt", patched_run["ckpt"], "--root", patched_run["root"], "--save-embeddings", "--no-plots")
    assert os.path.isfile(tmp_path / "eval" / "embeddings.pt")
    cli(tmp_path, "--ckpt", patched_run["ckpt"], "--root", patched_run["root"], "--overwrite", "--no-plots")
    assert not os.path.exists(tmp_path / "eval" / "embeddings.pt")  # it would not match the new metrics.json


def test_unknown_checkpoint_kind(patched_run, tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    expect_user_error(capsys, ["--ckpt", str(tmp_path / "model.pt"), "--root", patched_run["root"]],
                      "unknown kind", "--ckpt", "01_patch_clip.py", "student.pt")
    os.makedirs(tmp_path / "folder")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "folder" / "model.pt")
    expect_user_error(capsys, ["--ckpt", str(tmp_path / "folder"), "--root", patched_run["root"]],
                      "is a folder", "model.pt", "01_patch_clip.py")


def test_truncated_checkpoint(student_run, patched_run, tmp_path, capsys):
    data = open(student_run["ckpt"], "rb").read()
    open(tmp_path / "student.pt", "wb").write(data[:len(data) // 2])
    expect_user_error(capsys, ["--ckpt", str(tmp_path / "student.pt"), "--root", patched_run["root"],
                               "--out", str(tmp_path / "eval")], str(tmp_path / "student.pt"), "truncated")
    assert not os.path.exists(tmp_path / "eval")


@pytest.mark.parametrize("change", ["teacher missing", "teacher differs"])
def test_student_whose_teacher_cannot_be_found(patched_run, student_run, tmp_path, capsys, change):
    record = torch.load(student_run["ckpt"], weights_only=True)
    if change == "teacher missing":
        record["teacher"]["path"] = str(tmp_path / "gone")
    else:
        record["teacher"]["weights_sha256"] = "0" * 64
    C.save_torch(str(tmp_path / "student.pt"), record)
    expect_user_error(capsys, ["--ckpt", str(tmp_path / "student.pt"), "--root", patched_run["root"],
                               "--out", str(tmp_path / "eval")], "--teacher")
    assert not os.path.exists(tmp_path / "eval")  # refused before anything is written


@pytest.mark.parametrize("flags, phrase", [
    (["--split-seed", "1"], "--split-seed"),
    (["--model", "ViT-B-32"], "--model"),
    (["--name", "RemoteCLIP"], "--name"),
    (["--teacher", "x.pt"], "--teacher"),
])
def test_flags_that_contradict_the_checkpoint(patched_run, tmp_path, capsys, flags, phrase):
    expect_user_error(capsys, ["--ckpt", patched_run["ckpt"], "--root", patched_run["root"],
                               "--out", str(tmp_path / "eval"), *flags], phrase)


def test_student_on_rgb_data(student_run, rgb_root, tmp_path, capsys):
    expect_user_error(capsys, ["--ckpt", student_run["ckpt"], "--data", "eurosat", "--root", rgb_root,
                               "--out", str(tmp_path / "eval")], "--data eurosat_ms")


def test_results_log_that_cannot_be_written(patched_run, tmp_path, capsys):
    open(tmp_path / "a-file", "w").close()  # a folder path through a file fails even for root
    expect_user_error(capsys, ["--ckpt", patched_run["ckpt"], "--root", patched_run["root"], "--out",
                               str(tmp_path / "eval"), "--results", str(tmp_path / "a-file" / "results.jsonl")],
                      "--results", "results.jsonl")


def test_small_split_caveats():
    assert E.small_split_caveats(500, True) == [] and E.small_split_caveats(33, False) == []
    assert E.small_split_caveats(33, True) == ["33 test images: recall@50 is 1 for any model; read these as a check, "
                                               "not a measurement"]
    (one,) = E.small_split_caveats(1, False)
    assert "precision@10 ranks all of them" in one and "every average precision is 1" in one
