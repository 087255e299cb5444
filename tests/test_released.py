"""The authors' released weights (docs/released.md). Files are built here exactly as their agents.py
and main.py write them (open_clip, random weights, their construction steps repeated: the text
transformer deleted, a torch.compile wrapper's '_orig_mod.' keys, the optimizer and grad scaler saved
beside the model), then loaded by this project and compared with the authors' own models, and the
input pipeline with theirs on real tifs; stage 3 evaluates them and stage 2 aligns under one; a file
of the other kind, of the wrong teacher size, and one that carries code are refused in one line."""
import glob
import json
import os

import numpy as np
import pytest
import tifffile
import torch
from conftest import (ROOT, SHARED_BEN, TINY_CLIP, TINY_STUDENT, load_stage, make_bigearthnet_patch,
                      make_eurosat_ms, official_names)

import common as C

E = load_stage("03_eval.py")
align = load_stage("02_align_s2.py")
SHARED_MS = os.path.join(ROOT, "..", "shared", "data", "eurosat_ms_sample")
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT_S_16_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 12}


# ----------------------------------------------------------------------------- the authors' files


def save_as_the_authors(module, prefix, drop, path):
    """agents.py's save_checkpoint: the state dict of the torch.compile'd module ('_orig_mod.' before
    every key), `prefix` stripped, the keys holding `drop` deleted, with optimizer and scaler."""
    compiled = torch.nn.Module()
    compiled._orig_mod = module  # what torch.compile's wrapper holds
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    moved = [p for n, p in module.named_parameters() if "visual." in n and p.requires_grad][:2]
    sum((p * p).sum() for p in moved).backward()  # a step of the image tower: a state to save
    optimizer.step()
    state = compiled.state_dict()
    for key in list(state):
        if prefix in key:
            state[key.replace(prefix, "")] = state.pop(key)
        if drop in key:
            del state[key]
    torch.save({"model": state, "optimizer": optimizer.state_dict(),
                "scaler": torch.amp.GradScaler("cpu").state_dict()}, path)


def authors_clip(folder, name, quick_gelu=True, seed=0):
    """base.pt (the un-patched CLIP's weights, as a user passes them with --pretrained FILE) and a
    patched CLIP as PatchingAgent writes it; returns the authors' model: the base with QuickGELU
    (open_clip 2.x built 'openai' so), its text transformer deleted, the image tower moved."""
    import open_clip
    torch.manual_seed(seed)
    base = open_clip.create_model(TINY_CLIP)
    torch.save(base.state_dict(), folder / "base.pt")
    clip = open_clip.create_model(TINY_CLIP + "-quickgelu" * quick_gelu)
    clip.load_state_dict(base.state_dict())
    delattr(clip, "transformer")  # models.ImageEncoder(keep_lang=False)
    with torch.no_grad():  # fine-tuning and interpolation move the image tower
        for p in clip.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    classifier = torch.nn.Module()  # models.ImageClassifier
    classifier.image_encoder = torch.nn.Module()
    classifier.image_encoder.model = clip
    classifier.classification_head = torch.nn.Linear(32, 19).requires_grad_(False)
    save_as_the_authors(classifier, "_orig_mod.image_encoder.model.", "classification_head",
                        folder / name)
    return clip.eval()


def authors_student(folder, name, teacher_dim, arch="test_vit", text=TINY_TEXT, seed=1):
    """An aligned student as main.py builds it (their conf/models/vit-s-16.json, written here with
    `arch`; a 13-band patch embedding; the text transformer deleted; visual.head a Linear to the
    teacher's embedding size) and AlignmentAgent writes it; returns the authors' model."""
    import open_clip
    config = {"embed_dim": 1024, "vision_cfg": {
        "timm_model_name": arch, "timm_model_pretrained": False, "timm_pool": "",
        "timm_proj": "linear", "timm_drop": 0.0, "timm_drop_path": 0.2, "image_size": 224},
        "text_cfg": text}
    with open(folder / f"vit-s-16-{arch}.json", "w") as f:
        json.dump(config, f)
    open_clip.add_model_config(str(folder / f"vit-s-16-{arch}.json"))
    torch.manual_seed(seed)
    student = open_clip.create_model(f"vit-s-16-{arch}", pretrained="")
    width = student.visual.trunk.num_features  # 384 in their code
    student.visual.trunk.patch_embed.proj = torch.nn.Conv2d(13, width, kernel_size=(16, 16),
                                                            stride=(16, 16))
    delattr(student, "transformer")
    student.visual.head = torch.nn.Linear(width, teacher_dim)
    teacher = open_clip.create_model(TINY_CLIP).requires_grad_(False)
    kd = torch.nn.Module()  # models.KDClassifier
    kd.teacher_model = torch.nn.Module()
    kd.teacher_model.model = teacher
    kd.student_model = student
    kd.classification_head = torch.nn.Linear(teacher_dim, 19).requires_grad_(False)
    kd.logit_scale = teacher.logit_scale
    save_as_the_authors(kd, "_orig_mod.student_model.", "teacher_model", folder / name)
    return student.eval()


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_clip_config):
    """A folder as a user downloads it: the patched CLIP, an aligned student and its start."""
    folder = tmp_path_factory.mktemp("released")
    clip = authors_clip(folder, f"{TINY_CLIP}_openai_paint_05.pt")
    student = authors_student(folder, f"{TINY_CLIP}_openai_al_4.pt", 32)
    start = authors_student(folder, f"{TINY_CLIP}_openai_zs.pt", 32, seed=2)
    ms = make_eurosat_ms(folder / "ms", per_class=3)
    return {"folder": folder, "clip": clip, "student": student, "start": start, "ms": ms,
            "base": str(folder / "base.pt"), "paint": str(folder / f"{TINY_CLIP}_openai_paint_05.pt"),
            "al": str(folder / f"{TINY_CLIP}_openai_al_4.pt")}


@pytest.fixture
def tiny_student(monkeypatch):
    monkeypatch.setattr(E, "RELEASED_STUDENT", "test_vit")  # timm's test ViT for vit_small's speed


# ----------------------------------------------------------------------------- the models


def test_a_released_clip_embeds_as_the_authors_model(released, capsys):
    import open_clip
    clip, meta, tokenizer = C.load_teacher(released["paint"], "cpu", base=(None, released["base"]))
    log = capsys.readouterr().out
    assert meta["model"] == TINY_CLIP + "-quickgelu" and "QuickGELU" in log  # 'openai', a FILE: said
    assert meta["alpha"] == 0.5 and meta["dataset"] == "bigearthnet19"
    assert "ignored optimizer, scaler, 0 keys" in log
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, expected = clip.encode_image(x), released["clip"].encode_image(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # the text transformer is the base's: the text tower as the authors' CLIP had it
        base = open_clip.create_model(TINY_CLIP + "-quickgelu")
        base.load_state_dict(torch.load(released["base"], weights_only=True))
        tokens = tokenizer(["a satellite photo of a forest.", "a river."])
        torch.testing.assert_close(clip.encode_text(tokens), base.encode_text(tokens), atol=1e-6,
                                   rtol=0)
        gelu = open_clip.create_model(TINY_CLIP)  # open_clip 3.x's build of the tag: another model
        gelu.load_state_dict(clip.state_dict())
        assert (gelu.encode_image(x) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch, text", [("test_vit", TINY_TEXT),
                                        ("vit_small_patch16_224", VIT_S_16_TEXT)])
def test_a_released_student_embeds_as_the_authors_model(released, tmp_path, monkeypatch, capsys,
                                                        arch, text):
    """The tiny ViT, and once the real vit-s-16 (timm's vit_small_patch16_224, 22M parameters)."""
    monkeypatch.setattr(E, "RELEASED_STUDENT", arch)
    authors = authors_student(tmp_path, f"{TINY_CLIP}_openai_al_4.pt", 32, arch, text)
    student = E.load_released_student(str(tmp_path / f"{TINY_CLIP}_openai_al_4.pt"), 32, "t")
    # ignored: the text leftovers (token and positional embedding, final norm, projection, logit
    # scale: 6) and the compiled wrapper's classification head and logit scale (3)
    assert "ignored optimizer, scaler, 9 keys" in capsys.readouterr().out
    assert student.authors and student.input_size == authors.visual.trunk.patch_embed.img_size[0]
    x = torch.randn(2, 13, student.input_size, student.input_size)
    with torch.no_grad():
        torch.testing.assert_close(student(x), authors.encode_image(x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the input pipeline


def authors_val_resize(size):
    """transforms.py: of open_clip's validation transform, Resize and CenterCrop only."""
    import open_clip
    from torchvision.transforms import CenterCrop, Resize
    kept = [t for t in open_clip.image_transform(size, is_train=False).transforms
            if isinstance(t, (Resize, CenterCrop))]
    assert len(kept) == 2
    return kept


def authors_ms(stored, level, size):
    """transforms.py's student input of one image (bands first, float, as stored): S2_L2A puts a zero
    B10 after the 10th band, S2_L1C keeps the order; the resize, then / 10000 clamped to [0, 1]."""
    if level == "L2A":
        stored = torch.cat((stored[:10], torch.zeros((1, *stored.shape[1:])), stored[10:]))
    for transform in authors_val_resize(size):
        stored = transform(stored)
    return torch.clamp(stored / 10000.0, 0, 1)


def authors_rgb(stored, rgb_max, preprocess):
    """transforms.py's RGB_L1C / RGB_L2A: bands 3, 2, 1 / rgb_max * 255, clamped, uint8, a PIL image;
    then open_clip's whole validation transform."""
    from torchvision.transforms import ToPILImage
    rgb = torch.clamp((stored[[3, 2, 1]] / rgb_max) * 255, 0, 255).to(torch.uint8)
    return preprocess(ToPILImage("RGB")(rgb))


def torchgeo_bigearthnet(folder):
    """The 12 stored bands in the release's order, 20 and 60 m bands to 120 px by bilinear
    interpolation as float (PIL's, an implementation independent of common.s2_bands)."""
    from PIL import Image
    name = os.path.basename(folder)
    bands = []
    for band in ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"):
        image = tifffile.imread(os.path.join(folder, f"{name}_{band}.tif")).astype(np.float32)
        bands.append(np.array(Image.fromarray(image, mode="F").resize((120, 120), Image.BILINEAR)))
    return torch.from_numpy(np.stack(bands))


def real_batch(source):
    """(raw batch, the authors' stored images, level, pixels) of real tifs from ../shared/data."""
    if source == "eurosat_ms":
        if not os.path.isdir(SHARED_MS):
            pytest.skip(f"{SHARED_MS} (real EuroSAT MS tifs) is not present")
        files = sorted(glob.glob(os.path.join(SHARED_MS, "*", "*.tif")))[::20]
        raw = torch.from_numpy(np.stack([C.read_s2_tif(f) for f in files]))
        stored = [torch.from_numpy(tifffile.imread(f).astype(np.float32)).permute(2, 0, 1)
                  for f in files]
        return raw, stored, "L1C", C.DATA["eurosat_ms"].pixels
    if not os.path.isdir(SHARED_BEN):
        pytest.skip(f"{SHARED_BEN} (real BigEarthNet patches) is not present")
    folders = [os.path.join(SHARED_BEN, p) for p in sorted(os.listdir(SHARED_BEN))]
    parts = [C.read_bigearthnet(f) for f in folders]
    raw = tuple(torch.from_numpy(np.stack([p[k] for p in parts])) for k in range(3))
    return raw, [torchgeo_bigearthnet(f) for f in folders], "L2A", C.DATA["bigearthnet19"].pixels


@pytest.mark.parametrize("source", ["eurosat_ms", "bigearthnet19"])
def test_the_input_pipeline_is_the_authors_on_real_tifs(source):
    """The student's input: the same float32 operations in another order of code (x * 1e-4 against
    / 10000, one rounding apart; BigEarthNet's upsampling, torch's against PIL's bilinear, differs
    by under 0.005 of a digital number), so within 1e-6 of reflectance. The CLIP's: within 0.02 in
    normalised units, about one grey level, as PIL rounds each resampling pass to 8 bits."""
    import open_clip
    raw, stored, level, pixels = real_batch(source)
    got = C.ms_input(raw, 224, "cpu", pixels, authors=True)
    expected = torch.stack([authors_ms(image, level, 224) for image in stored])
    assert got.shape == (len(stored), 13, 224, 224)
    assert (got - expected).abs().max() < 1e-6
    own = C.ms_input(raw, 224, "cpu", pixels)  # this project's: L2A in another band order
    assert ((own - expected).abs().max() > 1e-3) == (level == "L2A")
    cfg = open_clip.create_model(TINY_CLIP, force_image_size=224).visual.preprocess_cfg
    preprocess = open_clip.image_transform(224, is_train=False, mean=cfg["mean"], std=cfg["std"])
    got = C.clip_input(raw, cfg, "cpu", pixels)
    expected = torch.stack([authors_rgb(image, {"L1C": 3558, "L2A": 2000}[level], preprocess)
                            for image in stored])
    assert (got - expected).abs().max() < 0.02


def test_rgb_scale_2000_is_the_authors_sen12ms_composite(tmp_path):
    """Their SEN12MS is declared S2_L2A: x 255/2000 where this project's L1C constant is 3558."""
    import dataclasses

    import open_clip
    from test_sen12ms import make_sen12ms
    root, _, _ = make_sen12ms(tmp_path / "sen12ms", per_scene=1)
    scenes = C.load_split("sen12ms", root, "test", 0)
    raw = next(C.batch_loader(C.open_images(scenes), 8))["images"]
    stored = [torch.from_numpy(tifffile.imread(os.path.join(root, f)).astype(np.float32))
              for f in scenes.files]  # bands first, as stored
    cfg = open_clip.create_model(TINY_CLIP).visual.preprocess_cfg
    preprocess = open_clip.image_transform(cfg["size"], is_train=False)
    expected = torch.stack([authors_rgb(image, 2000, preprocess) for image in stored])
    pixels = dataclasses.replace(scenes.pixels, rgb_max=2000)  # what --rgb-scale 2000 does
    assert (C.clip_input(raw, cfg, "cpu", pixels) - expected).abs().max() < 0.02
    assert (C.clip_input(raw, cfg, "cpu", scenes.pixels) - expected).abs().max() > 0.1


# ----------------------------------------------------------------------------- stage 3 and stage 2


def evaluate(out, *flags):
    E.main([*flags, "--workers", "0", "--out", str(out), "--results", str(out.parent / "r.jsonl"),
            "--no-plots"])
    return json.load(open(out / "metrics.json"))


def test_stage3_evaluates_a_released_student_with_its_teacher(released, tmp_path, tiny_student,
                                                               capsys):
    """Zero-shot, retrieval, cross-modal retrieval and the gap before (..._zs.pt beside it) and after,
    each embedding as the authors' models give it on the authors' input (within 1e-4)."""
    import open_clip
    m = evaluate(tmp_path / "eval", "--ckpt", released["al"], "--teacher", released["paint"],
                 "--pretrained", released["base"], "--data", "eurosat_ms", "--root", released["ms"],
                 "--save-embeddings")
    assert m["ckpt_kind"] == "student" and m["teacher"] == released["paint"]
    assert m["model"] == TINY_CLIP + "-quickgelu" and m["case"] == {"clip_rgb": "transfer",
                                                                    "student_ms": "transfer"}
    assert set(m["metrics"]) >= {"zeroshot", "text_to_image", "cross_modal", "modality_gap"}
    assert list(m["metrics"]["modality_gap"]) == ["after", "before"]
    saved = torch.load(tmp_path / "eval" / "embeddings.pt", weights_only=True)
    files = [os.path.join(released["ms"], f) for f in saved["files"]]
    stored = [torch.from_numpy(tifffile.imread(f).astype(np.float32)).permute(2, 0, 1) for f in files]
    with torch.no_grad():
        for name, model in (("student_ms", released["student"]), ("student_init_ms", released["start"])):
            x = torch.stack([authors_ms(image, "L1C", 160) for image in stored])  # test_vit: 160 px
            torch.testing.assert_close(saved["features"][name], model.encode_image(x), atol=1e-4,
                                       rtol=0)
        raw = torch.from_numpy(np.stack([C.read_s2_tif(f) for f in files]))
        x = C.clip_input(raw, released["clip"].visual.preprocess_cfg, "cpu",
                         C.DATA["eurosat_ms"].pixels)
        torch.testing.assert_close(saved["features"]["clip_rgb"], released["clip"].encode_image(x),
                                   atol=1e-5, rtol=0)
    # the un-patched base as the teacher (main.py's): the same zero-shot head, another CLIP
    base = evaluate(tmp_path / "base", "--ckpt", released["al"], "--teacher", "base",
                    "--pretrained", released["base"], "--data", "eurosat_ms", "--root", released["ms"])
    assert base["teacher"] == "base" and base["teacher_sha256"] is None
    assert base["metrics"]["zeroshot"]["student_ms"] == m["metrics"]["zeroshot"]["student_ms"]
    assert base["metrics"]["modality_gap"] != m["metrics"]["modality_gap"]
    E.main(["--summary", str(tmp_path / "r.jsonl")])
    table = capsys.readouterr().out
    assert f"student {os.path.relpath(released['al'])} (released by the authors)" in table
    assert f"patched CLIP {os.path.relpath(released['paint'])} (released by the authors)" in table
    assert f"CLIP {TINY_CLIP} ({released['base']})" in table  # the base teacher
    del open_clip


def test_stage3_evaluates_a_released_clip_on_the_data_it_was_trained_on(released, tmp_path,
                                                                         capsys):
    """BigEarthNet-19's official train split: only its test split is evaluated ('trained on')."""
    root = tmp_path / "ben"
    for split in ("train", "test"):
        for k, name in enumerate(official_names(split, 3)):
            make_bigearthnet_patch(root, name, ["Pastures", "Mixed forest"][k % 2:], seed=k)
    m = evaluate(tmp_path / "eval", "--ckpt", released["paint"], "--pretrained", released["base"],
                 "--data", "bigearthnet19", "--root", str(root))
    assert m["ckpt_kind"] == "patched" and m["case"] == {"clip_rgb": "trained on"}
    assert m["split"] == "test" and m["n_images"] == 3 and m["ckpt_sha256"] == C.sha256_of(
        released["paint"])
    with pytest.raises(SystemExit):
        evaluate(tmp_path / "all", "--ckpt", released["paint"], "--pretrained", released["base"],
                 "--data", "bigearthnet19", "--root", str(root), "--split", "all")
    assert "trained on" in capsys.readouterr().err
    # paint_10 holds the fine-tuned tower; ft_0 (overwritten at alpha 0) and zs the zero-shot one:
    # an un-patched CLIP, which never saw BigEarthNet
    for name, kind in (("paint_10", "finetuned"), ("ft_0", "baseline"), ("zs", "baseline")):
        path = tmp_path / f"{TINY_CLIP}_openai_{name}.pt"
        os.symlink(released["paint"], path)
        ckpt = E.resolve_checkpoint(E.parse_args(["--ckpt", str(path), "--pretrained",
                                                  released["base"]]))
        assert (ckpt.kind, ckpt.released) == (kind, (str(path),))
        assert (ckpt.clip_meta or {}).get("alpha") == (1.0 if kind == "finetuned" else None)
    m = evaluate(tmp_path / "zs", "--ckpt", str(path), "--pretrained", released["base"], "--data",
                 "bigearthnet19", "--root", str(root))
    assert m["ckpt_kind"] == "baseline" and m["case"] == {"clip_rgb": "transfer"}
    assert m["name"] == f"{TINY_CLIP}_openai_zs ({TINY_CLIP}-quickgelu)"
    assert m["metrics"]["zeroshot"] == json.load(open(tmp_path / "eval" / "metrics.json"))[
        "metrics"]["zeroshot"]  # the same weights as paint_05, read the same way


def test_names_give_model_and_tag(tmp_path):
    for name, model, tag, alpha in [("ViT-B-32_laion2b_s34b_b79k_paint_05.pt", "ViT-B-32",
                                     "laion2b_s34b_b79k", 0.5),
                                    ("ViT-B-32-256_datacomp_s34b_b86k_al_4.pt", "ViT-B-32-256",
                                     "datacomp_s34b_b86k", 0.0),
                                    ("ViT-B-32_openai_paint_10.pt", "ViT-B-32", "openai", 1.0),
                                    ("ViT-B-32_openai_zs.pt", "ViT-B-32", "openai", 0.0)]:
        open(tmp_path / name, "w").close()
        meta = C.released_meta(str(tmp_path / name))
        assert (meta["model"], meta["pretrained"], meta["alpha"]) == (model, tag, alpha), name
    with pytest.raises(C.UserError, match="--model, --pretrained"):
        C.released_meta(str(tmp_path / "ViT-B-32_openai_paint_05.pt").replace("paint_05", "x"))


def test_stage2_aligns_a_new_student_under_a_released_teacher(released, tmp_path):
    out = tmp_path / "align"
    align.main(["--teacher", released["paint"], "--pretrained", released["base"], "--root",
                released["ms"], *TINY_STUDENT, "--epochs", "1", "--batch-size", "16", "--workers",
                "0", "--out", str(out), "--no-plots"])
    record = torch.load(out / "student.pt", weights_only=True)
    assert record["teacher"]["weights_sha256"] == C.sha256_of(released["paint"])
    m = evaluate(tmp_path / "eval", "--ckpt", str(out), "--pretrained", released["base"])
    assert m["teacher"] == released["paint"] and "cross_modal" in m["metrics"]


# ----------------------------------------------------------------------------- refused in one line


def expect_error(capsys, main, argv, *words):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--workers", "0"])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert e.value.code == 2 and line.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in line, (w, line)


def test_the_other_kind_a_wrong_teacher_size_and_a_missing_key_are_refused(released, tmp_path,
                                                                         capsys, tiny_student):
    flags = ["--pretrained", released["base"], "--data", "eurosat_ms", "--root", released["ms"],
             "--out", str(tmp_path / "e")]
    expect_error(capsys, E.main, ["--ckpt", released["al"], *flags], "--teacher FILE")
    expect_error(capsys, E.main, ["--ckpt", released["al"], "--teacher", released["al"], *flags],
                 released["al"], "is not the authors' CLIP")
    expect_error(capsys, align.main, ["--teacher", released["al"], *flags, *TINY_STUDENT],
                 released["al"], "is not the authors' CLIP")
    authors_student(tmp_path, f"{TINY_CLIP}_openai_al_0.pt", 48)  # aligned to a 48-d teacher
    expect_error(capsys, E.main, ["--ckpt", str(tmp_path / f"{TINY_CLIP}_openai_al_0.pt"),
                                  "--teacher", released["paint"], *flags],
                 "visual.head.weight", "(48, 64)", "(32, 64)", "embeds in 32-d")
    record = torch.load(released["paint"], weights_only=True)
    del record["model"]["visual.conv1.weight"]
    torch.save(record, tmp_path / f"{TINY_CLIP}_openai_paint_05.pt")
    expect_error(capsys, E.main, ["--ckpt", str(tmp_path / f"{TINY_CLIP}_openai_paint_05.pt"), *flags],
                 f"{TINY_CLIP}_openai_paint_05.pt lacks visual.conv1.weight")
    assert not os.path.exists(tmp_path / "e")


class Payload:
    """Unpickling it would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_file_that_carries_code_is_refused_and_its_code_never_runs(released, tmp_path, capsys):
    marker = str(tmp_path / "code-ran")
    path = tmp_path / f"{TINY_CLIP}_openai_paint_05.pt"
    torch.save({"model": {"visual.proj": torch.zeros(2)}, "optimizer": Payload(marker)}, path)
    for main, flag in ((E.main, "--ckpt"), (align.main, "--teacher")):
        expect_error(capsys, main, [flag, str(path), "--pretrained", released["base"], "--out",
                                    str(tmp_path / "out")], str(path), "holds code")
        assert not os.path.exists(marker)
