"""Stage 2: the alignment loss, the teacher cache, SSL4EO-style weights, the CLI and its failures."""
import glob
import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, TINY_STUDENT, hash_split, load_stage, make_eurosat_ms

import common as C

align = load_stage("02_align_s2.py")
evaluate = load_stage("03_eval.py")  # evaluate.load_student rebuilds a saved student


def align_args(patched_run, out, *extra, epochs=2):
    return ["--teacher", patched_run["ckpt"], "--root", patched_run["root"], *TINY_STUDENT,
            "--epochs", str(epochs), "--batch-size", "16", "--lr", "1e-3", "--workers", "0",
            "--out", str(out), *extra]


def expect_error(capsys, argv, *words):
    """The stage stops with exit code 2 and one line naming `words`, no traceback."""
    with pytest.raises(SystemExit) as e:
        align.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # progress bars may come before it
    assert line.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in line, (w, line)
    return line


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the loss


def test_alignment_loss_equals_independent_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    head = F.normalize(torch.randn(5, 3, generator=g), dim=0)
    logit_scale, y = torch.tensor(np.log(100.0)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss, mse, ce = align.alignment_loss(s, t, head, logit_scale, y, 0.05)
    logits = 100.0 * (s / s.norm(dim=1, keepdim=True)) @ head
    expected_ce = -(logits.log_softmax(1)[torch.arange(8), y]).mean()
    expected_mse = ((s - t) ** 2).sum() / s.numel()
    assert torch.allclose(mse, expected_mse) and torch.allclose(ce, expected_ce, atol=1e-5)
    assert torch.allclose(loss, expected_mse + 0.05 * expected_ce, atol=1e-6)
    # multi-label targets: binary cross-entropy with logits, averaged over images and classes
    multi = torch.tensor([[1, 0, 1]] * 4 + [[0, 1, 0]] * 4)
    _, _, bce = align.alignment_loss(s, t, head, logit_scale, multi, 0.05)
    expected_bce = -(multi * F.logsigmoid(logits) + (1 - multi) * F.logsigmoid(-logits)).mean()
    assert torch.allclose(bce, expected_bce, atol=1e-4)


# ----------------------------------------------------------------------------- SSL4EO-style weights


def test_ssl4eo_checkpoint_loads_every_backbone_tensor_in_band_order(tmp_path, capsys):
    student = C.Student("vit_tiny_patch16_224", 32, input_size=32)
    source = C.Student("vit_tiny_patch16_224", 32, input_size=224).backbone.state_dict()  # 224 px: 14x14 grid
    ckpt = {f"module.backbone.{k}": v for k, v in source.items()}
    ckpt["module.head.weight"] = torch.zeros(10, 192)  # a pretraining head: unexpected, ignored
    torch.save({"model": ckpt, "epoch": 99}, tmp_path / "ssl4eo.pth")
    align.load_backbone_weights(student, str(tmp_path / "ssl4eo.pth"), "ssl4eo")
    out = capsys.readouterr().out
    assert f"loaded {len(source)}/{len(source)}" in out and "module.head.weight" in out
    loaded = student.backbone.state_dict()
    for k, v in source.items():
        if k not in ("patch_embed.proj.weight", "pos_embed"):
            assert torch.equal(loaded[k], v), k
    for i, band in enumerate(C.S2_BANDS):  # EuroSAT's channel i takes SSL4EO's channel of the same band
        assert torch.equal(loaded["patch_embed.proj.weight"][:, i],
                           source["patch_embed.proj.weight"][:, C.SSL4EO_BANDS.index(band)])
    assert loaded["pos_embed"].shape == (1, 1 + 4, 192)  # resampled from 1 + 196 tokens
    assert torch.equal(loaded["pos_embed"][:, 0], source["pos_embed"][:, 0])  # the class token's is kept


def test_three_band_or_foreign_checkpoint_is_refused(tmp_path, patched_run, capsys):
    three_band = C.Student("test_vit", 32, input_size=32, in_chans=3).backbone.state_dict()  # as TINY_STUDENT
    torch.save({"state_dict": three_band}, tmp_path / "rgb.pth")
    expect_error(capsys, align_args(patched_run, tmp_path / "a", "--student-weights", str(tmp_path / "rgb.pth")),
                 "rgb.pth", "patch_embed.proj.weight", "13-band")
    torch.save({"model": {"conv1.weight": torch.zeros(3)}}, tmp_path / "resnet.pth")
    expect_error(capsys, align_args(patched_run, tmp_path / "b", "--student-weights", str(tmp_path / "resnet.pth")),
                 "resnet.pth", "--student")
    assert not os.path.exists(tmp_path / "a" / "student.pt") and not os.path.exists(tmp_path / "b" / "student.pt")


# ----------------------------------------------------------------------------- the stage end to end


@pytest.fixture(scope="module")
def aligned(patched_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("align")
    out, cache = base / "run", base / "cache"
    result = align.main(align_args(patched_run, out, "--cache", str(cache), epochs=6))
    return {**result, "out": str(out), "cache": str(cache)}


def batches_per_epoch(root):
    """Training steps per epoch at --batch-size 16 on the train split of `root`."""
    return C.training_batches(len(C.load_split("eurosat_ms", root, "train", 0).files), 16)


def fresh_teacher_embeddings(patched_run, root, split):
    """The patched CLIP, rebuilt by open_clip from its weights file, on the RGB composites of every
    tif of a split (read here with tifffile), in the split's file order."""
    import open_clip
    teacher, _, _ = open_clip.create_model_and_transforms(
        TINY_CLIP, pretrained=os.path.join(patched_run["ckpt"], C.OPEN_CLIP_WEIGHTS))
    meta = json.load(open(os.path.join(patched_run["ckpt"], "patched.json")))
    files = C.load_split("eurosat_ms", root, split, meta["split_seed"]).files
    raw = torch.from_numpy(np.stack([tifffile.imread(os.path.join(root, f)) for f in files]))
    with torch.no_grad():
        return teacher.eval().encode_image(C.clip_input(raw, meta["preprocess_cfg"], "cpu",
                                                        pixels=C.DATA["eurosat_ms"].pixels))


def teacher_files(folder):
    """Every teacher-*.pt below a folder, at any depth."""
    return glob.glob(os.path.join(str(folder), "**", "teacher-*.pt"), recursive=True)


def test_cli_writes_a_student_that_round_trips(aligned, patched_run):
    out = aligned["out"]
    student = evaluate.load_student(os.path.join(out, "student.pt"))
    record = torch.load(os.path.join(out, "student.pt"), weights_only=True)
    assert state_equal(student.state_dict(), aligned["student"].state_dict())
    assert record["teacher"]["weights_sha256"] == C.sha256_of(os.path.join(patched_run["ckpt"], C.OPEN_CLIP_WEIGHTS))
    assert (record["arch"], record["in_chans"], record["input_size"], record["embed_dim"]) == \
        ("test_vit", 13, 32, 32)
    # the training scenes, by the README's hashed split computed here (conftest.hash_split)
    ids = sorted(os.path.splitext(os.path.relpath(f, patched_run["root"]))[0]
                 for f in glob.glob(os.path.join(patched_run["root"], "*", "*.tif")))
    assert record["train_scenes"] == [i for i, s in zip(ids, hash_split(ids, 0)) if s == "train"]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(6))
    for row in metrics["epochs"]:
        assert {"train_mse", "train_ce", "val_mse", "val_acc"} <= row.keys()
    assert not os.path.exists(os.path.join(out, "last.pt"))  # a finished run keeps student.pt only
    assert not os.path.exists(out + ".partial")
    x = torch.rand(2, 13, 32, 32)
    assert torch.equal(student(x), aligned["student"].eval()(x))


def test_student_learns_the_teacher_and_the_teacher_is_untouched(aligned, patched_run):
    import open_clip
    teacher, _, _ = open_clip.create_model_and_transforms(
        "rsclip-tiny", pretrained=os.path.join(patched_run["ckpt"], C.OPEN_CLIP_WEIGHTS))
    assert state_equal(aligned["teacher"].state_dict(), teacher.state_dict())  # bit-identical after training
    # the validation MSE to a fresh teacher forward pass, before (student_init.pt) and after
    val = C.load_split("eurosat_ms", patched_run["root"], "val", 0)
    raw = C.ImageFiles(val)[list(range(len(val.files)))]["images"]
    meta = json.load(open(os.path.join(patched_run["ckpt"], "patched.json")))
    with torch.no_grad():
        target = teacher.eval().encode_image(C.clip_input(raw, meta["preprocess_cfg"], "cpu",
                                                          pixels=C.DATA["eurosat_ms"].pixels))
        mse = {name: F.mse_loss(evaluate.load_student(os.path.join(aligned["out"], name))(C.ms_input(raw, 32, "cpu")),
                                target).item() for name in ("student_init.pt", "student.pt")}
    assert mse["student.pt"] < 0.5 * mse["student_init.pt"], mse
    assert mse["student.pt"] == pytest.approx(aligned["metrics"][-1]["val_mse"], rel=1e-4)


def test_teacher_cache_equals_a_fresh_forward_pass(aligned, patched_run):
    """With --cache the teacher's embeddings of each split are kept in the cache folder (one file per
    split), equal to a fresh forward pass; nothing of them is kept in the run folder."""
    cached = [torch.load(p, weights_only=True)["embeddings"] for p in teacher_files(aligned["cache"])]
    assert len(cached) == 2 and teacher_files(aligned["out"]) == []
    for split in ("train", "val"):
        fresh = fresh_teacher_embeddings(patched_run, patched_run["root"], split)
        assert sum(c.shape == fresh.shape and torch.allclose(c, fresh, atol=1e-5) for c in cached) == 1, split


def test_resume_after_sigterm_equals_an_uninterrupted_run(aligned, patched_run, tmp_path, capsys, monkeypatch):
    """Stopped in the middle of epoch 1, the run keeps epoch 0's checkpoint; --resume goes on from
    there and ends where the uninterrupted run (with --cache) ended."""
    per_epoch = batches_per_epoch(patched_run["root"])
    calls = {"n": 0}
    loss = align.alignment_loss

    def loss_then_sigterm(*a, **k):  # a real SIGTERM arrives during the 2nd step of epoch 1
        calls["n"] += 1
        if calls["n"] == per_epoch + 2:
            signal.raise_signal(signal.SIGTERM)
        return loss(*a, **k)

    monkeypatch.setattr(align, "alignment_loss", loss_then_sigterm)
    argv = align_args(patched_run, tmp_path / "run", "--no-plots", epochs=6)
    with pytest.raises(SystemExit) as e:
        align.main(argv)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 130 and line.startswith("stopped: ") and "--resume" in line, line
    assert torch.load(tmp_path / "run.partial" / "last.pt", weights_only=True)["epoch"] == 0
    assert not os.path.exists(tmp_path / "run")  # OUT only ever holds a finished run
    monkeypatch.setattr(align, "alignment_loss", loss)
    align.main(argv + ["--resume"])
    assert not os.path.exists(tmp_path / "run.partial")
    resumed = torch.load(tmp_path / "run" / "student.pt", weights_only=True)["state_dict"]
    for k, v in aligned["student"].state_dict().items():
        assert torch.allclose(resumed[k], v, atol=1e-6), k
    # the per-epoch log too
    epochs = json.load(open(tmp_path / "run" / "metrics.json"))["epochs"]
    assert [row.keys() for row in epochs] == [row.keys() for row in aligned["metrics"]]
    for row, whole in zip(epochs, aligned["metrics"]):
        assert row == {k: pytest.approx(v, rel=1e-5) for k, v in whole.items()}


def test_same_command_without_cache_gives_the_same_metrics(aligned, patched_run, tmp_path):
    """The same command again, without --cache (files read from disk, the teacher embedded again):
    the same metrics, to the last digit."""
    align.main(align_args(patched_run, tmp_path / "again", "--no-plots", epochs=6))
    first = json.load(open(os.path.join(aligned["out"], "metrics.json")))["epochs"]
    again = json.load(open(tmp_path / "again" / "metrics.json"))["epochs"]
    assert first == again


def test_teacher_cache_is_never_nan_and_never_stale_after_a_repaired_file(patched_run, tmp_path, capsys):
    """Review: the teacher cache kept NaN rows of files skipped with --skip-bad-files and survived
    --overwrite; after the file was repaired the next run trained on NaN targets and blamed the
    learning rate. Cached targets are never NaN, and never stale; without --cache nothing is cached."""
    root, cache = tmp_path / "ms", tmp_path / "cache"
    make_eurosat_ms(root, per_class=2)  # 16 train scenes: one step an epoch, on all of them
    bad = C.load_split("eurosat_ms", str(root), "train", 0).files[1]
    (root / bad).write_bytes(b"II*\x00 not a GeoTIFF")  # a corrupt tif in the train split
    args = align_args(patched_run, tmp_path / "out", "--no-plots", epochs=1)
    args[args.index("--root") + 1] = str(root)

    def finished_with_finite_losses():
        metrics = json.load(open(tmp_path / "out" / "metrics.json"))
        assert metrics["epochs"] and all(math.isfinite(v) for row in metrics["epochs"] for v in row.values())
        return metrics

    # --cache packs whole splits: a bad file stops the run in one line, and nothing is cached of the teacher
    expect_error(capsys, [*args, "--cache", str(cache), "--skip-bad-files"], bad, "--cache", "--skip-bad-files")
    assert teacher_files(cache) == [] and not os.path.exists(tmp_path / "out")
    # without --cache the file is skipped, and no teacher embeddings are written anywhere
    align.main([*args, "--skip-bad-files"])
    assert list(finished_with_finite_losses()["skipped_files"]) == [str(root / bad)]
    assert teacher_files(tmp_path) == []
    # repaired: the next run over the finished one, with the same --cache, trains on the file's true targets
    rng = np.random.default_rng(5)
    tifffile.imwrite(root / bad, rng.integers(500, 3000, (64, 64, 13)).astype(np.uint16))
    align.main([*args, "--overwrite", "--cache", str(cache)])
    assert finished_with_finite_losses()["skipped_files"] == {}
    cached = [torch.load(p, weights_only=True)["embeddings"] for p in teacher_files(cache)]
    assert len(cached) == 2 and not any(e.isnan().any() for e in cached)  # the train and val splits'
    for split in ("train", "val"):  # the repaired file is row 1 of train
        fresh = fresh_teacher_embeddings(patched_run, str(root), split)
        (kept,) = [e for e in cached if e.shape == fresh.shape]
        torch.testing.assert_close(kept, fresh, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_wrong_band_count_tif_names_the_file(tmp_path, patched_run, capsys):
    root = tmp_path / "ms"
    shutil.copytree(patched_run["root"], root)
    bad = root / "Forest" / "Forest_1.tif"
    tifffile.imwrite(bad, np.zeros((64, 64, 4), np.uint16))
    args = align_args(patched_run, tmp_path / "out", epochs=1)
    args[args.index("--root") + 1] = str(root)
    expect_error(capsys, args, "Forest_1.tif", "13", "--skip-bad-files")


def test_teacher_that_is_not_a_stage1_output_is_refused(tmp_path, patched_run, capsys):
    import open_clip
    plain = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("rsclip-tiny").state_dict(), plain)  # no patched.json beside it
    args = align_args(patched_run, tmp_path / "out", epochs=1)
    args[args.index("--teacher") + 1] = str(plain)
    expect_error(capsys, args, "clip.pt", "01_patch_clip.py")
    args[args.index("--teacher") + 1] = str(tmp_path)  # a folder, but not a stage-1 run
    expect_error(capsys, args, str(tmp_path), "patched.json", "01_patch_clip.py")
    args[args.index("--teacher") + 1] = str(tmp_path / "missing.pt")
    expect_error(capsys, args, "missing.pt", "--teacher")


def test_classes_other_than_the_teachers_get_the_data_sets_own_prompts(tmp_path, patched_run):
    """A student can be aligned on other classes than the teacher was patched on: the CE term's head
    is the teacher's text tower on those classes' prompts, and the record says which."""
    root = make_eurosat_ms(tmp_path / "ms", per_class=3, classes=["Forest", "River", "SeaLake"])
    args = align_args(patched_run, tmp_path / "out", epochs=1)
    args[args.index("--root") + 1] = root
    align.main(args)
    record = torch.load(tmp_path / "out" / "student.pt", weights_only=True)
    assert record["classes"] == ["Forest", "River", "SeaLake"] and record["dataset"] == "eurosat_ms"
    assert record["classnames"] == ["forest", "river", "lake or sea"]
    assert record["templates"] == list(C.EUROSAT_TEMPLATES) and record["scenes"] == "eurosat"


def test_nan_loss_stops_and_keeps_the_finished_student(aligned, patched_run, tmp_path, capsys, monkeypatch):
    """A NaN loss in epoch 1 of an --overwrite: one line naming the step; the finished run in OUT is
    untouched and epoch 0's checkpoint is kept in OUT.partial for --resume."""
    out = tmp_path / "run"
    shutil.copytree(aligned["out"], out)
    finished = C.sha256_of(str(out / "student.pt"))
    per_epoch = batches_per_epoch(patched_run["root"])
    calls = {"n": 0}
    loss = align.alignment_loss

    def nan_in_epoch_1(*a, **k):
        calls["n"] += 1
        total, mse, ce = loss(*a, **k)
        return (total * float("nan"), mse, ce) if calls["n"] == per_epoch + 2 else (total, mse, ce)

    monkeypatch.setattr(align, "alignment_loss", nan_in_epoch_1)
    line = expect_error(capsys, align_args(patched_run, out, "--overwrite", "--no-plots"), f"step {per_epoch + 1}",
                        "--lr", f"{out}.partial/last.pt", "--resume")
    assert "nan" in line
    assert C.sha256_of(str(out / "student.pt")) == finished  # the finished checkpoint is not touched
    kept = torch.load(f"{out}.partial/last.pt", weights_only=True)  # the last good state is kept
    assert (kept["epoch"], kept["step"]) == (0, per_epoch)


@pytest.mark.parametrize("flags, word", [(["--student", "bogus_net"], "--student"), (["--device", "tpu9"], "--device")])
def test_bad_student_or_device_flag_is_one_line(tmp_path, patched_run, capsys, flags, word):
    expect_error(capsys, align_args(patched_run, tmp_path / "out", *flags, epochs=1), word)


def test_a_cnn_student_takes_any_input_size():
    student = C.Student("resnet18", 32, input_size=32)
    assert student(torch.rand(2, 13, 32, 32)).shape == (2, 32) and student.input_size == 32


def test_a_failed_overwrite_leaves_the_finished_run_as_it_was(aligned, patched_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(aligned["out"], out)
    before = {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))}
    expect_error(capsys, align_args(patched_run, out, "--overwrite", "--seed", "7",
                                    "--student-weights", str(tmp_path / "missing.pth")), "missing.pth")
    assert {p: open(p, "rb").read() for p in glob.glob(str(out / "*"))} == before


def test_rgb_data_set_is_refused(tmp_path, patched_run, rgb_root, capsys):
    args = align_args(patched_run, tmp_path / "out", epochs=1)
    args[args.index("--root") + 1] = rgb_root
    expect_error(capsys, [*args, "--data", "eurosat"], "Sentinel-2", "--data eurosat_ms")
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------- the official run's flags


def test_official_flags_drop_path_no_shuffle_and_an_exact_warm_up(patched_run, tmp_path, capsys):
    """The README's official command block: --drop-path (the student's stochastic depth, 0.2 by default
    as the official vit-s-16 config), --no-shuffle (the official align.json) and --warmup N, used as
    given (the default, 2000, is capped at a tenth of the run so that short runs leave warm-up)."""
    result = align.main(align_args(patched_run, tmp_path / "a", "--no-shuffle", "--warmup", "3", "--no-plots",
                                   epochs=1))
    assert "warm-up 3)" in capsys.readouterr().out
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in result["student"].backbone.blocks]
    assert rates[-1] == pytest.approx(0.2) and rates[0] == 0.0  # timm's linear rule up to --drop-path
    default = align.main(align_args(patched_run, tmp_path / "b", "--drop-path", "0", "--no-plots", epochs=1))
    assert all(block.drop_path1.__class__.__name__ == "Identity" for block in default["student"].backbone.blocks)
    assert "warm-up 0)" in capsys.readouterr().out  # a tenth of this short run


def test_a_clip_checkpoint_as_student_weights_names_a_few_keys_and_stops(patched_run, tmp_path, capsys):
    """--student-weights given a CLIP's weights printed ~18 KB of key names before its one-line error."""
    import safetensors.torch
    clip = safetensors.torch.load_file(os.path.join(patched_run["ckpt"], C.OPEN_CLIP_WEIGHTS))
    torch.save(clip, tmp_path / "clip.pt")
    with pytest.raises(SystemExit):
        align.main(align_args(patched_run, tmp_path / "a", "--student-weights", str(tmp_path / "clip.pt")))
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].startswith("error: --student-weights")
    listed = captured.out[captured.out.index("unexpected:"):]
    assert len(listed) < 400 and listed.count(",") == 3 and "more" in listed, listed


def test_max_steps_zero_is_refused(patched_run, tmp_path, capsys):
    expect_error(capsys, align_args(patched_run, tmp_path / "a", "--max-steps", "0"), "--max-steps: 0 is out of range")
    assert not os.path.exists(tmp_path / "a.partial")


def test_alignment_loss_refuses_an_exponentiated_logit_scale():
    """open_clip stores logit_scale on the log scale (log 100); a copied loss given exp of it,
    100, would overflow to NaN silently; it is refused in one line instead."""
    s, t, head = torch.randn(4, 8), torch.randn(4, 8), F.normalize(torch.randn(8, 3), dim=0)
    y = torch.tensor([0, 1, 2, 0])
    assert torch.isfinite(align.alignment_loss(s, t, head, torch.tensor(np.log(100.0)), y, 0.05)[0])
    with pytest.raises(ValueError, match="looks exponentiated; pass it on the log scale"):
        align.alignment_loss(s, t, head, torch.tensor(100.0), y, 0.05)
