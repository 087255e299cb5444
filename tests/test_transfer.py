"""Transfer: any model on any data set (held-out rule, several data sets, ImageNet, prompts files),
the paper's table from a results log (--summary), the loss ablation (--mse-weight), the official
recall cut-offs."""
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (TINY_CLIP, TINY_STUDENT, hash_split, load_stage, make_bigearthnet_patch, make_eurosat_ms, official_names,
                      tiny_patch_args)
from PIL import Image

import common as C

patch = load_stage("01_patch_clip.py")
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
    table, names = evaluate.summary_rows(KNOWN)
    eurosat, ben = ("eurosat_ms", "test", 100, "p1", None, None), ("bigearthnet19", "test", 100, "p1", None, None)
    assert table[("baseline", "ViT-B-32", "openai", None)] == {eurosat: (40.0, None), ben: (20.0, None)}
    patched = table[("patched", "/r/patch")]  # the later line (the student's teacher) wins: 71, not 70
    assert patched[eurosat] == pytest.approx((71.0, 31.0)) and patched[ben] == pytest.approx((50.0, 30.0))
    student = table[("student", "/r/align/student.pt")]
    assert student[eurosat] == pytest.approx((65.0, 25.0)) and student[ben] == pytest.approx((45.0, 25.0))
    text = evaluate.summary_table(table, names)
    assert text.splitlines()[0] == "| model | bigearthnet19 test, 100 images | eurosat_ms test, 100 images |"
    assert "| CLIP ViT-B-32 (openai) | 20.00 | 40.00 |" in text
    assert "| student /r/align/student.pt | 45.00 (+25.00) | 65.00 (+25.00) |" in text
    rows = list(csv.reader(io.StringIO(evaluate.summary_table(table, names, "csv"))))
    # csv is for machines: a number per cell, the gain in a column of its own
    assert rows[0] == ["model", "bigearthnet19 test, 100 images", "bigearthnet19 test, 100 images gain",
                       "eurosat_ms test, 100 images", "eurosat_ms test, 100 images gain"] and len(rows) == 4
    assert rows[-1] == ["student /r/align/student.pt", "45.00", "25.00", "65.00", "25.00"]
    assert ["CLIP ViT-B-32 (openai)", "20.00", "", "40.00", ""] in rows


def test_summary_rows_are_weights_not_paths():
    """A reviewer's scenario: after --overwrite, the old and the new weights at one path shared a row.
    A row is one set of weights (ckpt_sha256, teacher_sha256); a fine-tuned tower and a baseline from
    a weights file (RemoteCLIP, ...) are rows of their own, under names a reader recognises."""
    lines = [{**line("patched", "eurosat_ms", 0.60, ckpt="/r/p"), "ckpt_sha256": "aaaa1111"},
             {**line("patched", "eurosat_ms", 0.70, ckpt="/r/p"), "ckpt_sha256": "bbbb2222"},  # --overwrite
             {**line("finetuned", "eurosat_ms", 0.75, ckpt="/r/p/finetuned.pt"), "ckpt_sha256": "cccc"},
             {**line("student", "eurosat_ms", 0.71, ckpt="/r/a/student.pt", teacher="/r/p", student=0.5),
              "ckpt_sha256": "dddd", "teacher_sha256": "bbbb2222"},
             {**line("baseline", "eurosat_ms", 0.55, pretrained="/w/RemoteCLIP-ViT-B-32.pt"), "ckpt_sha256": "eeee",
              "name": "RemoteCLIP (ViT-B-32)"}]
    table, names = evaluate.summary_rows(lines)
    assert table[("patched", "aaaa1111")] and table[("patched", "bbbb2222")]  # two rows
    assert table[("patched", "bbbb2222")][("eurosat_ms", "test", 100, "p1", None, None)][0] == 71.0  # its teacher's
    text = evaluate.summary_table(table, names)
    assert "| patched CLIP /r/p [aaaa1111] | 60.00 |" in text and "| patched CLIP /r/p [bbbb2222] | 71.00 |" in text
    assert "| fine-tuned CLIP /r/p/finetuned.pt | 75.00 |" in text and "| RemoteCLIP (ViT-B-32) | 55.00 |" in text


def test_summary_keeps_other_seeds_and_roots_apart_but_not_official_splits():
    seed = dict(root="/d/eurosat")
    lines = [{**line("baseline", "eurosat_ms", 0.40), **seed, "split_seed": 4},
             {**line("patched", "eurosat_ms", 0.60, ckpt="/r/p"), **seed, "split_seed": 5},
             {**line("patched", "eurosat_ms", 0.55, ckpt="/r/p"), "root": "/e/eurosat", "split_seed": 5},
             {**line("baseline", "bigearthnet19", 0.20, metric="mean_average_precision"), "split_seed": 0},
             {**line("patched", "bigearthnet19", 0.30, ckpt="/r/p", metric="mean_average_precision"), "split_seed": 3}]
    text = evaluate.summary_table(*evaluate.summary_rows(lines))
    header = text.splitlines()[0]
    assert "eurosat_ms test, 100 images (seed 4)" in header and "eurosat_ms test, 100 images (seed 5) [/d/eurosat]" in header
    assert "[/e/eurosat]" in header and "(+20.00)" not in text  # no gain across other test images
    assert "| 30.00 (+10.00) |" in text  # the official BigEarthNet split is one column whatever the seed


def test_summary_keeps_other_prompts_and_other_splits_apart():
    lines = [line("baseline", "eurosat_ms", 0.40), line("patched", "eurosat_ms", 0.60, ckpt="/r/p", prompts="p2"),
             line("patched", "eurosat_ms", 0.50, ckpt="/r/p", split="all", n=200)]
    text = evaluate.summary_table(*evaluate.summary_rows(lines))
    header = text.splitlines()[0]
    assert "eurosat_ms test, 100 images [prompts p1]" in header and "eurosat_ms test, 100 images [prompts p2]" in header
    assert "eurosat_ms all" in header
    # no gain against a baseline that saw other prompts: the cell stands alone
    assert " 60.00 |" in text and "(+20.00)" not in text


def test_summary_cli_prints_markdown_and_refuses_a_missing_log(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    for row in KNOWN:
        evaluate.append_jsonl(str(path), row)
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


# ============================================================================ any model on any data set



def run_eval(tmp_path, *flags, out="eval"):
    """Stage 3 in-process; returns the results log's rows."""
    results = tmp_path / "results.jsonl"
    evaluate.main([*flags, "--workers", "0", "--out", str(tmp_path / out), "--results", str(results), "--no-plots"])
    return [json.loads(x) for x in open(results)]


def user_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        evaluate.main([*argv, "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def open_clip_head(model_folder, classnames, templates):
    """The zero-shot head as one would write it with open_clip alone."""
    import open_clip
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + model_folder)
    tokenizer = open_clip.get_tokenizer("local-dir:" + model_folder)
    model.eval()
    with torch.no_grad():
        columns = [F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in templates])), dim=-1)
                               .mean(0), dim=0) for c in classnames]
    return torch.stack(columns, dim=1)


def make_folder(root, classes, per_class=3, size=40):
    """A class-folder RGB data set of other classes than the patched CLIP's."""
    rng = np.random.default_rng(1)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for n in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3)).astype(np.uint8)).save(root / c / f"{n}.png")
    return str(root)


def test_patched_clip_on_a_data_set_with_other_classes(patched_run, tmp_path):
    root = make_folder(tmp_path / "other", ["airplane", "beach_sand", "forest"])
    (row,) = run_eval(tmp_path, "--ckpt", patched_run["ckpt"], "--data", "folder", "--root", root, "--split", "all",
                      "--save-embeddings")
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["case"] == {"clip_rgb": "transfer"} and row["case/clip_rgb"] == "transfer"
    assert metrics["split"] == "all" and metrics["n_images"] == 9
    assert metrics["prompts"] == {"classnames": ["airplane", "beach sand", "forest"],
                                  "templates": list(C.GENERIC_TEMPLATES)}
    saved = torch.load(tmp_path / "eval" / "embeddings.pt", weights_only=True)
    head = open_clip_head(patched_run["ckpt"], ["airplane", "beach sand", "forest"], C.GENERIC_TEMPLATES)
    torch.testing.assert_close(saved["zeroshot_head"], head, atol=1e-5, rtol=0)
    logits = saved["logit_scale"].exp() * F.normalize(saved["features"]["clip_rgb"], dim=-1) @ head
    assert metrics["metrics"]["zeroshot"]["clip_rgb"]["acc1"] == pytest.approx(
        (logits.argmax(1) == saved["labels"]).float().mean().item())


def test_own_scenes_other_classes_keep_the_held_out_split(patched_run, tmp_path):
    """EuroSAT tifs with three of the ten classes are still the patched CLIP's scenes: trained on,
    its test split and seed, the data set's own prompts for those classes."""
    root = make_eurosat_ms(tmp_path / "three", per_class=6, classes=["Forest", "River", "SeaLake"])
    (row,) = run_eval(tmp_path, "--ckpt", patched_run["ckpt"], "--root", root)
    assert row["case/clip_rgb"] == "trained on" and row["split"] == "test" and row["n_classes"] == 3
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["prompts"]["classnames"] == [C.EUROSAT_CLASSNAMES[c] for c in ["Forest", "River", "SeaLake"]]


def test_split_all_is_refused_on_the_scenes_a_model_trained_on(patched_run, tmp_path, capsys):
    line = user_error(capsys, ["--ckpt", patched_run["ckpt"], "--root", patched_run["root"], "--split", "all",
                               "--out", str(tmp_path / "eval")])
    assert "--split test" in line and not os.path.exists(tmp_path / "eval")


@pytest.fixture(scope="module")
def student_run(patched_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("align_transfer") / "run"
    align.main(["--teacher", patched_run["ckpt"], "--root", patched_run["root"], *TINY_STUDENT, "--epochs", "1",
                "--batch-size", "16", "--workers", "0", "--no-plots", "--out", str(out)])
    return {"out": str(out), "ckpt": str(out / "student.pt")}


def make_ben(root, n=4):
    """Generated patches in the BigEarthNet-S2 v1.0 layout, on the official test list."""
    labels = [["Coniferous forest"], ["Sea and ocean"], ["Coniferous forest", "Pastures"], ["Pastures"]]
    for i, name in enumerate(official_names("test", n)):
        make_bigearthnet_patch(root, name, labels[i % len(labels)], seed=i)
    return str(root)


def test_student_and_several_data_sets_in_one_run(patched_run, student_run, tmp_path, monkeypatch):
    """A student aligned on EuroSAT MS, evaluated on BigEarthNet-19 (transfer) and its own EuroSAT
    (trained on) in one run: each data set embedded once, one results line and run folder each."""
    ben = make_ben(tmp_path / "ben")
    calls = []
    embed = C.embed
    monkeypatch.setattr(C, "embed", lambda *a, **k: calls.append(1) or embed(*a, **k))
    rows = run_eval(tmp_path, "--ckpt", student_run["ckpt"], "--data", f"bigearthnet19={ben}",
                    f"eurosat_ms={patched_run['root']}")
    assert len(calls) == 2 and [r["data"] for r in rows] == ["bigearthnet19", "eurosat_ms"]
    assert rows[0]["case/student_ms"] == "transfer" and rows[0]["case/clip_rgb"] == "transfer"
    assert rows[1]["case/student_ms"] == "trained on" and rows[1]["case/clip_rgb"] == "trained on"
    assert rows[0]["n_images"] == 4 and "zeroshot/student_ms/mean_average_precision" in rows[0]
    for row in rows:
        assert os.path.isfile(os.path.join(tmp_path, "eval", f"{row['data']}-test", "metrics.json"))
    # the transfer data set's own prompts, the teacher's text tower
    metrics = json.load(open(tmp_path / "eval" / "bigearthnet19-test" / "metrics.json"))
    assert metrics["prompts"]["classnames"][0] == C.bigearthnet_nomenclature()["labels19"][0].lower()


@pytest.mark.parametrize("data, phrase", [
    (["eurosat_ms="], "names no folder"), (["nosuch"], "unknown --data 'nosuch'"),
    (["eurosat_ms=a", "eurosat=b", "--root", "c"], "--root is for a single"),
    (["eurosat_ms=a", "eurosat_ms=b"], "twice"),
])
def test_data_syntax_errors(patched_run, tmp_path, capsys, data, phrase):
    line = user_error(capsys, ["--ckpt", patched_run["ckpt"], "--out", str(tmp_path / "eval"), "--data", *data])
    assert phrase in line and not os.path.exists(tmp_path / "eval")


# ============================================================================ ImageNet


def make_imagenet(root, synsets):
    for synset in synsets:  # created in the order given, not sorted
        os.makedirs(root / synset)
        Image.fromarray(np.full((40, 40, 3), len(synset) * 3 % 255, np.uint8)).save(root / synset / "a.JPEG")
        Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(root / synset / "b.JPEG")
    return str(root)


def test_imagenet_folders_get_their_names_through_the_synset_ids(tmp_path, capsys):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    root = make_imagenet(tmp_path / "val", ["n15075141", "n01443537", "n01440764"])  # shuffled
    scenes = C.list_scenes("imagenet", str(tmp_path))  # root or root/val
    assert scenes.classes == ["n01440764", "n01443537", "n15075141"]
    assert scenes.classnames == [IMAGENET_CLASSNAMES[0], IMAGENET_CLASSNAMES[1], IMAGENET_CLASSNAMES[999]]
    assert scenes.classnames[:2] == ["tench", "goldfish"] and len(scenes.templates) == 80
    assert C.load_split("imagenet", root, "test", 0).files == scenes.files  # all of it is the test split
    os.makedirs(tmp_path / "val" / "n99999999")
    line = user_error(capsys, ["--model", TINY_CLIP, "--pretrained", "none", "--data", f"imagenet={root}",
                               "--out", str(tmp_path / "eval")])
    assert "n99999999" in line and "synset" in line and not os.path.exists(tmp_path / "eval")


def test_control_subset_is_fixed_by_the_seed(tmp_path):
    root = make_imagenet(tmp_path / "val", ["n01440764", "n01443537"])
    for synset in ("n01440764", "n01443537"):
        for n in range(6):
            Image.fromarray(np.full((8, 8, 3), n, np.uint8)).save(tmp_path / "val" / synset / f"x{n}.JPEG")
    scenes = C.list_scenes("imagenet", root)
    pick = patch.per_class_subset(scenes, 3, seed=0)
    assert len(pick.files) == 6 and sorted(set(pick.labels.tolist())) == [0, 1]
    assert patch.per_class_subset(scenes, 3, seed=0).files == pick.files
    assert patch.per_class_subset(scenes, 3, seed=1).files != pick.files
    os.remove(tmp_path / "val" / "n01440764" / next(f for f in os.listdir(tmp_path / "val" / "n01440764")
                                                    if "n01440764/" + f not in pick.files))
    assert patch.per_class_subset(C.list_scenes("imagenet", root), 3, seed=0).files == pick.files  # others never move


def test_stage1_with_imagenet_as_control(ms_root, tmp_path):
    control = make_imagenet(tmp_path / "imagenet", ["n01443537", "n01440764", "n01484850"])
    load_stage("01_patch_clip.py").main(tiny_patch_args(ms_root, tmp_path / "patch", "eurosat_ms", "--epochs", "1",
                                                   "--control", "imagenet", "--control-root", control,
                                                   "--control-per-class", "1", "--no-plots"))
    metrics = json.load(open(tmp_path / "patch" / "metrics.json"))
    assert metrics["control"]["dataset"] == "imagenet" and metrics["control"]["n_images"] == 3
    assert metrics["control"]["split"] == "test" and all("control_acc" in r for r in metrics["alphas"])


# ============================================================================ prompts as data


def test_prompts_file_changes_the_head_and_is_recorded(patched_run, tmp_path):
    prompts = {"classnames": {c: f"{c.lower()} seen from orbit" for c in C.EUROSAT_CLASSNAMES},
               "templates": ["an image of {}.", "{}"]}
    with open(tmp_path / "prompts.json", "w") as f:
        json.dump(prompts, f)
    (row,) = run_eval(tmp_path, "--ckpt", patched_run["ckpt"], "--root", patched_run["root"], "--prompts",
                      str(tmp_path / "prompts.json"), "--save-embeddings")
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    names = [prompts["classnames"][c] for c in sorted(C.EUROSAT_CLASSNAMES)]
    assert metrics["prompts"] == {"classnames": names, "templates": prompts["templates"]}
    saved = torch.load(tmp_path / "eval" / "embeddings.pt", weights_only=True)
    torch.testing.assert_close(saved["zeroshot_head"], open_clip_head(patched_run["ckpt"], names, prompts["templates"]),
                               atol=1e-5, rtol=0)
    assert row["prompts_sha256"] == C.sha256_of(metrics["prompts"])


@pytest.mark.parametrize("content, phrase", [
    ('{"classnames": {"Forest": "forest"}}', "no class name for 'AnnualCrop'"), ("not json", "not a JSON object"),
])
def test_bad_prompts_file(patched_run, tmp_path, capsys, content, phrase):
    (tmp_path / "p.json").write_text(content)
    line = user_error(capsys, ["--ckpt", patched_run["ckpt"], "--root", patched_run["root"], "--prompts",
                               str(tmp_path / "p.json"), "--out", str(tmp_path / "eval")])
    assert phrase in line and str(tmp_path / "p.json") in line and not os.path.exists(tmp_path / "eval")


def test_stage1_and_stage2_record_the_prompts_file(ms_root, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"templates": ["a multispectral image of {}."]}))
    load_stage("01_patch_clip.py").main(tiny_patch_args(ms_root, tmp_path / "patch", "eurosat_ms", "--epochs", "1",
                                                   "--prompts", str(tmp_path / "p.json"), "--no-plots"))
    meta = json.load(open(tmp_path / "patch" / "patched.json"))
    assert meta["templates"] == ["a multispectral image of {}."]
    align.main(["--teacher", str(tmp_path / "patch"), "--root", ms_root, *TINY_STUDENT, "--epochs", "1",
                "--batch-size", "16", "--workers", "0", "--no-plots", "--out", str(tmp_path / "align")])
    record = torch.load(tmp_path / "align" / "student.pt", weights_only=True)
    assert record["templates"] == meta["templates"]  # the teacher's prompts on its own scenes


# ============================================================================ found in review


def test_the_same_folder_under_another_data_set_name_is_still_trained_on(patched_run, tmp_path, capsys):
    """A CLIP patched on a class folder (--data folder) meets that folder as --data resisc45: the
    same scenes, held to its split, --split all refused. A copy of a training folder elsewhere (a
    reviewer's scenario: on node-local scratch, 83 of 120 images were training scenes, evaluated as a
    transfer) is held to the split too, by its scene ids, and says so; so is another folder of the same
    classes whose files are named as the training scenes (EuroSAT's jpgs are its tifs' scenes)."""
    from conftest import make_eurosat_rgb
    root = make_folder(tmp_path / "rs", ["baseball_diamond", "beach"], per_class=10)
    load_stage("01_patch_clip.py").main(tiny_patch_args(root, tmp_path / "patch", "folder", "--epochs", "1",
                                                        "--split-seed", "3", "--no-plots"))
    (row,) = run_eval(tmp_path, "--ckpt", str(tmp_path / "patch"), "--data", f"resisc45={root}/")
    assert row["case/clip_rgb"] == "trained on" and row["split_seed"] == 3
    line = user_error(capsys, ["--ckpt", str(tmp_path / "patch"), "--data", f"resisc45={root}", "--split", "all",
                               "--out", str(tmp_path / "all")])
    assert "--split test" in line and not os.path.exists(tmp_path / "all")
    copy = shutil.copytree(root, tmp_path / "scratch" / "rs")
    line = user_error(capsys, ["--ckpt", str(tmp_path / "patch"), "--data", f"folder={copy}", "--split", "all",
                               "--out", str(tmp_path / "copy_all")])
    assert "--split test" in line and not os.path.exists(tmp_path / "copy_all")
    (row,) = run_eval(tmp_path / "c", "--ckpt", str(tmp_path / "patch"), "--data", f"folder={copy}")
    train_count = sum(s == "train" for s in hash_split([f"{c}/{n}" for c in ("baseball_diamond", "beach")
                                                         for n in range(10)], 3))
    assert row["case/clip_rgb"] == f"trained on ({train_count} of its 20 scenes have the ids of its training " \
                                   f"scenes: a copy of its training data)" and row["split_seed"] == 3
    lookalike = os.path.join(make_eurosat_rgb(tmp_path / "rgb"), "eurosat", "2750")  # ids as patched_run's tifs
    line = user_error(capsys, ["--ckpt", patched_run["ckpt"], "--data", f"folder={lookalike}", "--split", "all",
                               "--out", str(tmp_path / "lookalike")])
    assert "trained on" in line and not os.path.exists(tmp_path / "lookalike")
    (row,) = run_eval(tmp_path / "b", "--ckpt", patched_run["ckpt"], "--data", f"folder={lookalike}")
    assert row["case/clip_rgb"].startswith("trained on (") and row["split"] == "test"


def test_a_students_teacher_meets_its_own_data_with_its_own_prompts(ms_root, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"templates": ["a sentinel-2 image of {}."]}))
    load_stage("01_patch_clip.py").main(tiny_patch_args(ms_root, tmp_path / "patch", "eurosat_ms", "--epochs", "1",
                                                        "--prompts", str(tmp_path / "p.json"), "--no-plots"))
    ben = tmp_path / "ben"
    for split, n in (("train", 8), ("val", 4)):
        for i, name in enumerate(official_names(split, n)):
            make_bigearthnet_patch(ben, name, [["Coniferous forest"], ["Pastures"]][i % 2], seed=i)
    align.main(["--teacher", str(tmp_path / "patch"), "--data", "bigearthnet19", "--root", str(ben), *TINY_STUDENT,
                "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-plots", "--out", str(tmp_path / "align")])
    (row,) = run_eval(tmp_path, "--ckpt", str(tmp_path / "align"), "--data", f"eurosat_ms={ms_root}")
    assert row["case/clip_rgb"] == "trained on" and row["case/student_ms"] == "transfer"
    metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert metrics["prompts"]["templates"] == ["a sentinel-2 image of {}."]  # the teacher's, as on its own


def test_a_bad_file_in_a_later_data_set_keeps_the_finished_ones_and_says_how_to_go_on(patched_run, tmp_path, capsys):
    root = make_folder(tmp_path / "other", ["airplane", "beach"], per_class=20)
    test_files = C.load_split("folder", root, "test", 0).files
    for f in test_files[1:]:  # the first sets the image size; the others are found bad while embedding
        (tmp_path / "other" / f).write_bytes(b"not an image")
    argv = ["--ckpt", patched_run["ckpt"], "--data", f"eurosat_ms={patched_run['root']}", f"folder={root}",
            "--split", "test", "--out", str(tmp_path / "eval"), "--results", str(tmp_path / "r.jsonl"), "--no-plots"]
    with pytest.raises(SystemExit) as e:
        evaluate.main([*argv, "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "finished before it: eurosat_ms" in err and f"--data folder={root}" in err
    assert os.path.isfile(tmp_path / "eval" / "eurosat_ms-test" / "metrics.json")
    assert not os.path.exists(tmp_path / "eval" / "folder-test")  # no half-made run folder


@pytest.mark.parametrize("flags", [["--control-per-class", "0", "--control", "folder"], ["--control-per-class", "3"]])
def test_control_per_class_needs_a_positive_number_and_a_control(ms_root, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as e:
        load_stage("01_patch_clip.py").main(tiny_patch_args(ms_root, tmp_path / "patch", "eurosat_ms", *flags))
    assert e.value.code == 2 and "--control-per-class" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "patch")
