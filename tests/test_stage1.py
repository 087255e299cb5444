"""Stage 1: the interpolation, the zero-shot head, what training may change, the saved patch,
the CLI end to end (RGB jpgs, MS tifs, a control set, real tifs), and its failures."""
import glob
import hashlib
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from conftest import EUROSAT_CLASSES, SAMPLE_MS, TINY_CLIP, load_stage, make_eurosat_ms, make_eurosat_rgb, \
    tiny_patch_args

import common as C

stage = load_stage("01_patch_clip.py")
SMALL = EUROSAT_CLASSES[:3]  # 6 files per class: 4 train, 1 val, 1 test


def small_ms(tmp_path):
    return make_eurosat_ms(tmp_path / "EuroSAT_MS", per_class=6, classes=SMALL, size=32)


def initial_model(seed=0):
    """The CLIP that `--pretrained none --seed 0` starts from, built with open_clip directly."""
    import open_clip
    torch.manual_seed(seed)
    return open_clip.create_model_and_transforms(TINY_CLIP)[0].eval()


def tokenizer():
    import open_clip
    return open_clip.get_tokenizer(TINY_CLIP)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def patched_weights(out):
    """The patched CLIP's state dict as stage 1 saved it (open_clip's folder format, safetensors)."""
    import safetensors.torch
    return safetensors.torch.load_file(os.path.join(out, C.OPEN_CLIP_WEIGHTS))


def interpolated(theta_0, theta_1, alpha):
    return {k: (1 - alpha) * theta_0[k] + alpha * theta_1[k] for k in theta_0}


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expect_error(capsys, argv, *words, out=None):
    """The stage stops with exit code 2 and one line `error: ...` naming `words` (progress bars
    aside), without a traceback, and leaves no patched CLIP."""
    with pytest.raises(SystemExit) as e:
        stage.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not re.search(r"\|.*\[\d\d:\d\d", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    if out is not None:
        assert not os.path.exists(os.path.join(out, "patched.json"))
        assert not os.path.exists(os.path.join(out, C.OPEN_CLIP_WEIGHTS))
    return lines[0]


# ----------------------------------------------------------------------------- the method's pieces


def test_interpolation_endpoints_are_exact_and_integer_buffers_are_rounded():
    theta_0, theta_1 = initial_model(0).visual.state_dict(), initial_model(1).visual.state_dict()
    theta_0["steps"], theta_1["steps"] = torch.tensor([5, 7]), torch.tensor([15, 7])  # a counter, e.g. BatchNorm's
    assert not torch.equal(theta_0["conv1.weight"], theta_1["conv1.weight"])
    assert state_equal(stage.interpolate_weights(theta_0, theta_1, 0.0), theta_0)
    assert state_equal(stage.interpolate_weights(theta_0, theta_1, 1.0), theta_1)
    middle = stage.interpolate_weights(theta_0, theta_1, 0.3)
    for k, w0 in theta_0.items():
        if k != "steps":
            expected = (0.7 * w0.double() + 0.3 * theta_1[k].double()).float()
            assert torch.allclose(middle[k], expected, atol=1e-6), k
    assert middle["steps"].dtype == torch.int64 and middle["steps"].tolist() == [8, 7]  # 0.7 * 5 + 0.3 * 15
    with pytest.raises(AssertionError):  # a key missing on one side
        stage.interpolate_weights(theta_0, {k: v for k, v in theta_1.items() if k != "proj"}, 0.5)
    with pytest.raises(AssertionError):  # boolean tensors (masks) must agree
        stage.interpolate_weights({**theta_0, "mask": torch.tensor([True])}, {**theta_1, "mask": torch.tensor([False])},
                                  0.5)


def test_zeroshot_head_equals_encode_text_of_the_prompts():
    model, tok = initial_model(), tokenizer()
    classnames = list(C.EUROSAT_CLASSNAMES.values()) + ["river delta", "glacier"]  # 12: two batches of classes
    head = C.zeroshot_head(model, tok, classnames, C.EUROSAT_TEMPLATES, "cpu")
    columns = []
    with torch.no_grad():
        for name in classnames:
            e = model.encode_text(tok([t.format(name) for t in C.EUROSAT_TEMPLATES]))
            e = e / e.norm(dim=-1, keepdim=True)
            mean = e.mean(0)
            columns.append(mean / mean.norm())
    expected = torch.stack(columns, dim=1)
    assert head.shape == (32, 12)
    assert torch.allclose(head, expected, atol=1e-5)
    features = torch.randn(4, 32)
    logits = C.zeroshot_logits(features, head, model.logit_scale)
    assert torch.allclose(logits, model.logit_scale.exp() * (features / features.norm(dim=1, keepdim=True)) @ expected,
                          atol=1e-4)


# ----------------------------------------------------------------------------- the shared run (eurosat_ms)


def test_training_changes_only_the_image_tower(patched_run):
    initial = initial_model().state_dict()
    patched, finetuned = patched_weights(patched_run["out"]), load(os.path.join(patched_run["out"], "finetuned.pt"))
    assert patched.keys() == initial.keys()
    others = [k for k in initial if not k.startswith("visual.")]
    assert "logit_scale" in others and "token_embedding.weight" in others and len(others) > 10
    for k in others:  # text tower, logit_scale, ... bit-identical to the model the run started from
        assert torch.equal(patched[k], initial[k]), k
    assert finetuned.keys() == {k[len("visual."):] for k in initial if k.startswith("visual.")}
    assert not all(torch.equal(v, initial["visual." + k]) for k, v in finetuned.items())  # it did train
    # hence the zero-shot head is the same for the patched model as for the initial one
    meta = json.load(open(os.path.join(patched_run["out"], "patched.json")))
    model = initial_model()
    before = C.zeroshot_head(model, tokenizer(), meta["classnames"], meta["templates"], "cpu")
    model.load_state_dict(patched)
    assert torch.equal(C.zeroshot_head(model, tokenizer(), meta["classnames"], meta["templates"], "cpu"), before)


def test_patched_checkpoint_round_trips_and_is_the_interpolation(patched_run):
    import open_clip
    out, ckpt = patched_run["out"], patched_run["ckpt"]
    meta = json.load(open(os.path.join(out, "patched.json")))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert meta["kind"] == "rsclip-align/patched-clip" and meta["model"] == TINY_CLIP
    assert meta["alpha"] == metrics["chosen_alpha"] == 0.5  # no --control: --alpha's default
    assert meta["classes"] == EUROSAT_CLASSES and meta["split_seed"] == 0 and meta["dataset"] == "eurosat_ms"
    weights = os.path.join(ckpt, C.OPEN_CLIP_WEIGHTS)
    assert meta["weights_sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    saved = patched_weights(out)
    model = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=weights)[0]  # by name and weights file
    assert state_equal(model.state_dict(), saved)
    same, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + ckpt)  # open_clip's folder format
    as_json = lambda cfg: json.loads(json.dumps(cfg))  # noqa: E731 (tuples and lists alike)
    assert state_equal(same.state_dict(), saved)
    assert as_json(same.visual.preprocess_cfg) == as_json(model.visual.preprocess_cfg) == as_json(meta["preprocess_cfg"])
    initial, finetuned = initial_model().state_dict(), load(os.path.join(out, "finetuned.pt"))
    zeroshot = {k[len("visual."):]: v for k, v in initial.items() if k.startswith("visual.")}
    expected = interpolated(zeroshot, finetuned, 0.5)
    for k, v in expected.items():
        assert torch.allclose(saved["visual." + k], v, rtol=1e-6, atol=0), k
    assert [row["alpha"] for row in metrics["alphas"]] == [0, 0.5, 1]
    assert not os.path.exists(os.path.join(out, "last.pt")) and os.path.isfile(os.path.join(out, "args.json"))
    # the reported validation accuracy at alpha 0.5 is that of the saved model
    val = C.load_split("eurosat_ms", patched_run["root"], "val", 0)
    raw = C.ImageFiles(val)[list(range(len(val.files)))]["images"]
    head = C.zeroshot_head(model, tokenizer(), meta["classnames"], meta["templates"], "cpu")
    with torch.no_grad():
        features = model.eval().encode_image(C.clip_input(raw, meta["preprocess_cfg"], "cpu", pixels=C.DATA["eurosat_ms"].pixels))
    predicted = (F.normalize(features, dim=-1) @ head).argmax(1).numpy()
    assert metrics["alphas"][1]["task_acc"] == pytest.approx(np.mean(predicted == val.labels))


def test_finetuning_lowers_the_training_loss(patched_run):
    meta = json.load(open(os.path.join(patched_run["out"], "patched.json")))
    train = C.load_split("eurosat_ms", patched_run["root"], "train", 0)
    batch = C.ImageFiles(train)[list(range(len(train.files)))]
    model = initial_model()
    head = C.zeroshot_head(model, tokenizer(), meta["classnames"], meta["templates"], "cpu")
    x, y = C.clip_input(batch["images"], meta["preprocess_cfg"], "cpu", pixels=C.DATA["eurosat_ms"].pixels), batch["labels"]

    def loss():
        with torch.no_grad():
            f = F.normalize(model.encode_image(x), dim=-1)
            return F.cross_entropy(model.logit_scale.exp() * f @ head, y).item()
    before = loss()
    model.visual.load_state_dict(load(os.path.join(patched_run["out"], "finetuned.pt")))
    after = loss()
    assert after < 0.8 * before, (before, after)
    log = read_log(os.path.join(patched_run["out"], "log.jsonl"))
    assert [row["epoch"] for row in log] == [0, 1] and [row["step"] for row in log] == [3, 6]
    assert log[1]["train_loss"] < log[0]["train_loss"]


# ----------------------------------------------------------------------------- the CLI on other data


def test_cli_on_eurosat_jpgs_with_a_control_folder_picks_the_best_mean(tmp_path):
    task = make_eurosat_rgb(tmp_path / "task", per_class=6, classes=SMALL, size=32)
    control_classes = ["baseball_diamond", "beach", "dense_residential"]
    make_eurosat_rgb(tmp_path / "control", per_class=6, classes=control_classes, size=32, seed=1)
    control_root = str(tmp_path / "control" / "eurosat" / "2750")
    out = tmp_path / "out"
    stage.main(tiny_patch_args(task, out, "eurosat", "--control", "folder", "--control-root", control_root))
    metrics = json.load(open(out / "metrics.json"))
    meta = json.load(open(out / "patched.json"))
    rows = metrics["alphas"]
    assert [r["alpha"] for r in rows] == [0, 0.5, 1]
    best = max(r["task_acc"] + r["control_acc"] for r in rows)
    expected = min(r["alpha"] for r in rows if r["task_acc"] + r["control_acc"] >= best - 1e-9)  # ties: less change
    assert meta["alpha"] == metrics["chosen_alpha"] == expected
    assert meta["classes"] == SMALL and meta["dataset"] == "eurosat"
    assert meta["classnames"] == ["annual crop land", "forest", "brushland or shrubland"]
    patched, finetuned = patched_weights(out), load(out / "finetuned.pt")
    zeroshot = {k[len("visual."):]: v for k, v in initial_model().state_dict().items() if k.startswith("visual.")}
    for k, v in interpolated(zeroshot, finetuned, expected).items():
        assert torch.allclose(patched["visual." + k], v, rtol=1e-6, atol=0), k
    # the control accuracy at alpha 0 is the initial model's zero-shot accuracy, with the folder names as classes
    model, tok = initial_model(), tokenizer()
    val = C.load_split("folder", control_root, "val", 0)
    with torch.no_grad():
        head = []
        for name in ("baseball diamond", "beach", "dense residential"):
            prompts = [f"a satellite photo of {name}.", f"a satellite photo of a {name}.",
                       f"a satellite photo of the {name}."]
            head.append(F.normalize(F.normalize(model.encode_text(tok(prompts)), dim=-1).mean(0), dim=0))
        raw = C.ImageFiles(val)[list(range(len(val.files)))]["images"]
        features = F.normalize(model.encode_image(C.clip_input(raw, meta["preprocess_cfg"], "cpu")), dim=-1)
    predicted = (features @ torch.stack(head, 1)).argmax(1).numpy()
    assert rows[0]["control_acc"] == pytest.approx(np.mean(predicted == val.labels))


def test_alpha_rule_takes_the_best_mean_and_the_smaller_alpha_on_ties(tmp_path, monkeypatch):
    root = small_ms(tmp_path)
    make_eurosat_rgb(tmp_path / "control", per_class=6, classes=["beach", "glacier"], size=32)
    scripted = [0.2, 0.9, 0.9, 0.5, 0.95, 0.45]  # (task, control) at alpha 0, 0.5, 1: means 0.55, 0.7, 0.7
    monkeypatch.setattr(C, "zeroshot_score", lambda *args: ("acc", scripted.pop(0)))
    out = tmp_path / "out"
    stage.main(tiny_patch_args(root, out, "eurosat_ms", "--control", "folder",
                               "--control-root", str(tmp_path / "control" / "eurosat" / "2750")))
    metrics = json.load(open(out / "metrics.json"))
    assert [(r["task_acc"], r["control_acc"]) for r in metrics["alphas"]] == [(0.2, 0.9), (0.9, 0.5), (0.95, 0.45)]
    assert metrics["chosen_alpha"] == json.load(open(out / "patched.json"))["alpha"] == 0.5
    zeroshot = {k[len("visual."):]: v for k, v in initial_model().state_dict().items() if k.startswith("visual.")}
    patched, finetuned = patched_weights(out), load(out / "finetuned.pt")
    for k, v in interpolated(zeroshot, finetuned, 0.5).items():
        assert torch.allclose(patched["visual." + k], v, rtol=1e-6, atol=0), k


@pytest.mark.skipif(not os.path.isdir(SAMPLE_MS), reason=f"{SAMPLE_MS} (200 real EuroSAT MS tifs) is not present")
def test_cli_on_real_eurosat_ms_tifs_and_their_rgb_composite(tmp_path):
    out = tmp_path / "out"
    stage.main(tiny_patch_args(SAMPLE_MS, out, "eurosat_ms", "--epochs", "1", "--batch-size", "32",
                               "--alphas", "0", "1", "--cache", str(tmp_path / "cache")))
    meta = json.load(open(out / "patched.json"))
    metrics = json.load(open(out / "metrics.json"))
    assert meta["classes"] == EUROSAT_CLASSES and metrics["steps"] == 5  # 140 train tifs, 32 a step
    assert all(0 <= r["task_acc"] <= 1 for r in metrics["alphas"]) and metrics["skipped_files"] == {}
    # the composite: B04, B03, B02 (index 3, 2, 1 of B01..B12,B8A) x 255/3558, clipped, truncated
    for path in sorted(glob.glob(os.path.join(SAMPLE_MS, "*", "*_1.tif"))):
        ms = tifffile.imread(path)
        assert ms.shape == (64, 64, 13) and ms.dtype == np.uint16
        expected = np.floor(np.clip(np.stack([ms[..., 3], ms[..., 2], ms[..., 1]], -1) * 255.0 / 3558, 0, 255))
        got = C.rgb_composite(torch.from_numpy(ms.astype(np.float32)).permute(2, 0, 1)[None], 3558)[0].permute(1, 2, 0)
        assert torch.equal(got, torch.from_numpy(expected).float()), path
        assert 0 <= got.min() and got.max() <= 255 and 10 < got.mean() < 200, (path, got.mean())
        # red, green and blue really are B04, B03, B02: B01 (aerosol) and B10 (cirrus) differ from them
        assert not np.array_equal(expected[..., 2], np.floor(np.clip(ms[..., 0] * 255.0 / 3558, 0, 255)))
        assert ms[..., 9].mean() < 0.1 * ms[..., 3].mean()  # B10 (cirrus) is nearly dark


# ----------------------------------------------------------------------------- failures: exit 2, one line


def test_missing_data_root(tmp_path, capsys):
    expect_error(capsys, tiny_patch_args(tmp_path / "nowhere", tmp_path / "out"), tmp_path / "nowhere", "--root",
                 out=tmp_path / "out")


def test_empty_class_folder(tmp_path, capsys):
    root = small_ms(tmp_path)
    os.makedirs(os.path.join(root, "River"))
    expect_error(capsys, tiny_patch_args(root, tmp_path / "out"), os.path.join(root, "River"), out=tmp_path / "out")


def test_unknown_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        stage.main(tiny_patch_args(tmp_path, tmp_path / "out", "sentinel3"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown --data 'sentinel3'" in err and "eurosat_ms" in err


def test_corrupt_jpg_is_named(tmp_path, capsys):
    root = make_eurosat_rgb(tmp_path / "rgb", per_class=6, classes=SMALL, size=32)
    train = C.load_split("eurosat", root, "train", 0)
    bad = os.path.join(train.root, train.files[0])  # the very first file of the split
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[:300])
    expect_error(capsys, tiny_patch_args(root, tmp_path / "out", "eurosat"), bad, "--skip-bad-files",
                 out=tmp_path / "out")


@pytest.mark.parametrize("kind", ["truncated", "3 bands", "float32"])
def test_bad_tif_is_named(tmp_path, capsys, caplog, kind):
    root = small_ms(tmp_path)
    train = C.load_split("eurosat_ms", root, "train", 0)
    bad = os.path.join(root, train.files[0 if kind != "float32" else 5])
    image, data = tifffile.imread(bad), open(bad, "rb").read()
    if kind == "truncated":
        open(bad, "wb").write(data[:4000])
    else:
        tifffile.imwrite(bad, image[..., :3] if kind == "3 bands" else image.astype(np.float32))
    reason = {"truncated": "cannot read", "3 bands": "(32, 32, 3)", "float32": "float32"}[kind]
    expect_error(capsys, tiny_patch_args(root, tmp_path / "out"), bad, reason, out=tmp_path / "out")
    assert not [r for r in caplog.records if r.name == "tifffile"]  # no second line from tifffile's logger


def test_missing_or_broken_pretrained_checkpoint(tmp_path, capsys):
    root = small_ms(tmp_path)
    expect_error(capsys, tiny_patch_args(root, tmp_path / "a") + ["--pretrained", str(tmp_path / "no.pt")],
                 "--pretrained", tmp_path / "no.pt", out=tmp_path / "a")
    torch.save(initial_model().state_dict(), tmp_path / "clip.pt")
    data = open(tmp_path / "clip.pt", "rb").read()
    open(tmp_path / "truncated.pt", "wb").write(data[:len(data) // 2])
    expect_error(capsys, tiny_patch_args(root, tmp_path / "b") + ["--pretrained", str(tmp_path / "truncated.pt")],
                 "--pretrained", tmp_path / "truncated.pt", out=tmp_path / "b")
    (tmp_path / "garbage.pt").write_text("this is not a checkpoint\n" * 10)
    expect_error(capsys, tiny_patch_args(root, tmp_path / "c") + ["--pretrained", str(tmp_path / "garbage.pt")],
                 "--pretrained", tmp_path / "garbage.pt", out=tmp_path / "c")


def test_output_folder_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    expect_error(capsys, tiny_patch_args(small_ms(tmp_path), tmp_path / "a_file" / "run"), "--out",
                 tmp_path / "a_file" / "run")


def test_finished_run_needs_overwrite_and_the_same_command_gives_the_same_run(patched_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(patched_run["out"], out)  # the shared run stays as it is
    before = open(out / C.OPEN_CLIP_WEIGHTS, "rb").read()
    expect_error(capsys, tiny_patch_args(patched_run["root"], out), out, "--overwrite")
    assert open(out / C.OPEN_CLIP_WEIGHTS, "rb").read() == before
    os.remove(out / "finetuned.pt")
    stage.main(tiny_patch_args(patched_run["root"], out, "eurosat_ms", "--overwrite"))
    assert json.load(open(out / "metrics.json")) == json.load(open(os.path.join(patched_run["out"], "metrics.json")))
    assert state_equal(load(out / "finetuned.pt"), load(os.path.join(patched_run["out"], "finetuned.pt")))
    assert state_equal(patched_weights(out), patched_weights(patched_run["out"]))
    assert read_log(out / "log.jsonl") == read_log(os.path.join(patched_run["out"], "log.jsonl"))


def test_skip_bad_files_skips_a_corrupt_tif_and_records_it(tmp_path, capsys):
    root = small_ms(tmp_path)
    train = C.load_split("eurosat_ms", root, "train", 0)
    bad = os.path.join(root, train.files[0])
    open(bad, "wb").write(b"II*\0" + b"\0" * 100)
    stage.main(tiny_patch_args(root, tmp_path / "out", "eurosat_ms", "--skip-bad-files", "--alphas", "0", "1"))
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert list(metrics["skipped_files"]) == [bad] and "(H, W, 13)" in metrics["skipped_files"][bad]
    assert metrics["steps"] == 2 and os.path.isfile(tmp_path / "out" / "patched.json")
    assert "skipped 1 unreadable files" in capsys.readouterr().out


def test_cache_refuses_a_corrupt_tif_even_with_skip_bad_files(tmp_path, capsys):
    root = small_ms(tmp_path)
    bad = os.path.join(root, C.load_split("eurosat_ms", root, "train", 0).files[2])
    open(bad, "wb").write(b"II*\0" + b"\0" * 100)
    expect_error(capsys, tiny_patch_args(root, tmp_path / "out", "eurosat_ms", "--skip-bad-files",
                                         "--cache", str(tmp_path / "cache")), bad, "--cache", out=tmp_path / "out")


# ----------------------------------------------------------------------------- NaN, interruption, resume


def test_nan_loss_stops_naming_the_step_and_never_loses_a_finished_run(patched_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(patched_run["out"], out)  # a finished run (3 steps an epoch)
    finished = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    calls = []
    logits = C.zeroshot_logits

    def nan_at_fifth_step(features, head, logit_scale):
        calls.append(1)
        result = logits(features, head, logit_scale)
        return result * float("nan") if len(calls) == 5 else result
    monkeypatch.setattr(C, "zeroshot_logits", nan_at_fifth_step)
    message = expect_error(capsys, tiny_patch_args(patched_run["root"], out, "eurosat_ms", "--overwrite", "--seed", "1"),
                           "step 4", "--lr", "last.pt")
    assert "nan" in message
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == finished  # the finished run
    last = load(f"{out}.partial/last.pt")  # the end of epoch 0, the last good state
    assert (last["step"], last["epoch"]) == (3, 0) and last["identity"]["seed"] == 1
    assert all(torch.isfinite(v).all() for v in last["visual"].values() if v.is_floating_point())
    assert not os.path.exists(f"{out}.partial/finetuned.pt")


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, capsys, monkeypatch):
    """A real SIGTERM in epoch 1 (mid-epoch: that epoch is done again), then one in the alpha sweep (the
    sweep is done again): each resume continues from the last finished epoch, to the uninterrupted run."""
    root = small_ms(tmp_path)
    argv = lambda out, *extra: tiny_patch_args(root, out, "eurosat_ms", "--batch-size", "4", "--alphas", "0", "1",
                                               "--no-plots", *extra)  # 3 steps an epoch, 6 in all
    stage.main(argv(tmp_path / "whole"))
    out, partial = tmp_path / "parts", tmp_path / "parts.partial"

    def sigterm_at(n, module, name):
        original, calls = getattr(module, name), []

        def wrapper(*a, **k):
            calls.append(1)
            if len(calls) == n:
                signal.raise_signal(signal.SIGTERM)
            return original(*a, **k)
        monkeypatch.setattr(module, name, wrapper)
    for n, module, name in ((5, C, "check_finite"), (2, C, "zeroshot_score")):  # step 4 (epoch 1); the 2nd alpha
        sigterm_at(n, module, name)
        with pytest.raises(SystemExit) as e:
            stage.main(argv(out, *(["--resume"] if name == "zeroshot_score" else [])))
        monkeypatch.undo()
        err = capsys.readouterr().err
        assert e.value.code == 130 and err.startswith("stopped: ") and err.count("\n") == 1, err
        assert f"{partial}/last.pt" in err and "--resume" in err
        last = load(partial / "last.pt")
        assert (last["step"], last["epoch"]) == ((3, 0) if name == "check_finite" else (6, 1))
        assert [r["epoch"] for r in read_log(partial / "log.jsonl")] == list(range(last["epoch"] + 1))
        assert not os.path.exists(out) and not os.path.exists(partial / "patched.json")
        if name == "check_finite":  # other settings than the run's are refused
            expect_error(capsys, argv(out, "--resume", "--lr", "0.01"), "--lr")
            expect_error(capsys, argv(out, "--resume", "--grad-clip", "0.5"), "--grad-clip")
    stage.main(argv(out, "--resume"))
    assert state_equal(load(out / "finetuned.pt"), load(tmp_path / "whole" / "finetuned.pt"))
    assert state_equal(patched_weights(out), patched_weights(tmp_path / "whole"))
    assert json.load(open(out / "metrics.json")) == json.load(open(tmp_path / "whole" / "metrics.json"))
    assert read_log(out / "log.jsonl") == read_log(tmp_path / "whole" / "log.jsonl")
    assert json.load(open(out / "patched.json")) == json.load(open(tmp_path / "whole" / "patched.json"))
    assert not os.path.exists(out / "last.pt") and not os.path.exists(partial)


def test_quickgelu_weights_are_recorded_under_the_name_that_rebuilds_them(tmp_path):
    """OpenAI's weights need QuickGELU, which a state dict cannot carry: patched.json names open_clip's
    '-quickgelu' config, so create_model_and_transforms(meta['model'], pretrained=path) gives the same model."""
    import open_clip
    assert stage.open_clip_name("rsclip-tiny", True) == "rsclip-tiny-quickgelu"
    assert stage.open_clip_name("rsclip-tiny", False) == "rsclip-tiny"
    assert stage.open_clip_name("ViT-B-32", True) == "ViT-B-32-quickgelu"
    torch.manual_seed(0)
    model = open_clip.create_model("rsclip-tiny", force_quick_gelu=True).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x = torch.rand(2, 3, 32, 32)
    same, _, _ = open_clip.create_model_and_transforms(stage.open_clip_name("rsclip-tiny", True),
                                                       pretrained=str(tmp_path / "w.pt"))
    plain, _, _ = open_clip.create_model_and_transforms("rsclip-tiny", pretrained=str(tmp_path / "w.pt"))
    with torch.no_grad():
        assert torch.equal(same.eval().encode_image(x), model.encode_image(x))
        assert not torch.allclose(plain.eval().encode_image(x), model.encode_image(x))  # GELU: another model


# ----------------------------------------------------------------------------- hints that fit the mistake


def test_multispectral_tifs_read_as_rgb_get_one_line_and_the_hint(tmp_path, capsys, caplog):
    """--data eurosat --root <EuroSAT MS tifs> printed PIL's 'More samples per pixel than can be
    decoded: 13' once per file, then an error without the hint that fits: --data eurosat_ms."""
    root = small_ms(tmp_path)
    expect_error(capsys, tiny_patch_args(root, tmp_path / "out", "eurosat"), "--data eurosat_ms", out=tmp_path / "out")
    assert not [r for r in caplog.records if r.name.startswith("PIL")]


@pytest.mark.parametrize("data", ["eurosat_ms", "folder"])
def test_a_root_one_level_too_high_is_said(tmp_path, capsys, data):
    root = small_ms(tmp_path / "data") if data == "eurosat_ms" else \
        make_eurosat_rgb(tmp_path / "data" / "rgb", per_class=2, classes=SMALL, size=16)
    inner = root if data == "eurosat_ms" else os.path.join(root, "eurosat")
    os.makedirs(tmp_path / "data" / "notes")  # a folder beside it
    line = expect_error(capsys, tiny_patch_args(os.path.dirname(inner), tmp_path / "out", data), "one level too high")
    assert line.endswith(f"pass --root {inner}")


def test_max_steps_zero_is_refused(tmp_path, capsys):
    """--max-steps 0 wrote a 'patched' CLIP that was never fine-tuned, without a word."""
    expect_error(capsys, tiny_patch_args(small_ms(tmp_path), tmp_path / "out", "eurosat_ms", "--max-steps", "0"),
                 "--max-steps: 0 is out of range: pass a value >= 1", out=tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_the_patched_weights_are_readable_by_others_as_every_output(patched_run):
    """safetensors writes its file 0600; the patched CLIP is shared like every other output."""
    import stat
    modes = {f: stat.S_IMODE(os.stat(os.path.join(patched_run["out"], f)).st_mode)
             for f in (C.OPEN_CLIP_WEIGHTS, "patched.json", "metrics.json", "finetuned.pt")}
    assert set(modes.values()) == {0o644}, modes
