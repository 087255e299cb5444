"""Other CLIP families and checkpoint formats than the default path: a ResNet CLIP (int image size,
BatchNorm counters), an open_clip tag with its own preprocessing and QuickGELU, open_clip's folder
format, weights that are not cached while offline, and MoCo / DINO checkpoints for the student."""
import json
import os
import socket
import time

import pytest
import torch
from conftest import TINY_CLIP, TINY_STUDENT, load_stage, make_eurosat_ms

import common as C

patch = load_stage("01_patch_clip.py")
align = load_stage("02_align_s2.py")
evaluate = load_stage("03_eval.py")

TINY_RESNET = "rsclip-tiny-rn"  # a ModifiedResNet CLIP: open_clip stores its image size as a plain int
TINY_RESNET_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory, tiny_clip_config):
    import open_clip
    path = tmp_path_factory.mktemp("configs") / f"{TINY_RESNET}.json"
    path.write_text(json.dumps(TINY_RESNET_CONFIG))
    open_clip.add_model_config(str(path))
    return TINY_RESNET


def small_ms(tmp_path):
    return make_eurosat_ms(tmp_path / "ms", per_class=8, classes=["Forest", "River", "SeaLake"], size=32)


def run_args(model, root, out, *extra):
    return ["--model", model, "--pretrained", "none", "--data", "eurosat_ms", "--root", str(root), "--epochs", "1",
            "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--alphas", "0", "0.5", "1", "--out", str(out),
            *extra]


def test_a_resnet_clip_is_patched_and_evaluated(tiny_resnet, tmp_path):
    """RN50-style CLIPs: an int image size, and BatchNorm counters that fine-tuning advances."""
    import open_clip
    import safetensors.torch
    root, out = small_ms(tmp_path), tmp_path / "patch"
    patch.main(run_args(tiny_resnet, root, out))
    finetuned = torch.load(out / "finetuned.pt", weights_only=True)
    counters = [k for k in finetuned if k.endswith("num_batches_tracked")]
    assert counters and all(finetuned[k].item() > 0 for k in counters)  # fine-tuning did advance them
    patched = safetensors.torch.load_file(out / C.OPEN_CLIP_WEIGHTS)
    for k in counters:  # alpha 0.5 of 0 and n steps: n / 2, rounded
        assert patched["visual." + k].item() == round(0.5 * finetuned[k].item())
    rebuilt, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(out))
    assert isinstance(rebuilt.visual.preprocess_cfg["size"], int) or rebuilt.visual.preprocess_cfg["size"] == (32, 32)
    evaluate.main(["--ckpt", str(out), "--root", str(root), "--workers", "0", "--out", str(tmp_path / "eval"),
                   "--results", str(tmp_path / "results.jsonl")])
    evaluate.main(["--model", tiny_resnet, "--pretrained", "none", "--data", "eurosat_ms", "--root", str(root),
                   "--workers", "0", "--out", str(tmp_path / "baseline"), "--results", str(tmp_path / "results.jsonl")])
    with open(tmp_path / "results.jsonl") as f:
        assert len([json.loads(line) for line in f]) == 2


def test_clip_input_takes_an_int_size_and_each_resize_mode():
    raw = torch.randint(0, 255, (2, 20, 40, 3), dtype=torch.uint8)  # a wide image
    cfg = {"size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    for mode, check in [("shortest", lambda x: x.shape == (2, 3, 16, 16)),
                        ("squash", lambda x: x.shape == (2, 3, 16, 16)),
                        ("longest", lambda x: x.shape == (2, 3, 16, 16) and bool((x[:, :, :4] == -1).all()))]:
        x = C.clip_input(raw, {**cfg, "resize_mode": mode}, "cpu")  # 'longest' pads 20x40 -> 8x16 with black (-1)
        assert check(x), mode
    squashed = C.clip_input(raw, {**cfg, "resize_mode": "squash"}, "cpu")
    expected = torch.nn.functional.interpolate(raw.permute(0, 3, 1, 2).float() / 255, size=(16, 16), mode="bilinear",
                                               antialias=True, align_corners=False)
    torch.testing.assert_close(squashed, (expected.clamp(0, 1) - 0.5) / 0.5, atol=0.02, rtol=0)


def test_a_tags_preprocessing_and_quickgelu_reach_every_stage(tmp_path, monkeypatch, tiny_clip_config):
    """A tag with its own mean/std and resize mode (as SigLIP's) and QuickGELU (as OpenAI's): stage 1
    records them in open_clip's folder format, and stages 2 and 3 use exactly those settings."""
    import open_clip
    import open_clip.pretrained as pretrained
    torch.manual_seed(0)
    start = open_clip.create_model(TINY_CLIP, force_quick_gelu=True)
    torch.save(start.state_dict(), tmp_path / "tag.pt")
    tag = {"file": str(tmp_path / "tag.pt"), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "interpolation": "bilinear", "resize_mode": "squash", "quick_gelu": True}
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_CLIP, {"sigliplike": tag})
    root, out = small_ms(tmp_path), tmp_path / "patch"
    patch.main(run_args(TINY_CLIP, root, out, "--pretrained", "sigliplike"))
    config = json.load(open(out / C.OPEN_CLIP_CONFIG))
    assert config["model_cfg"]["quick_gelu"] is True
    assert config["preprocess_cfg"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                        "resize_mode": "squash"}
    teacher, meta, _ = C.load_teacher(str(out), "cpu")
    assert isinstance(teacher.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert meta["model"] == TINY_CLIP + "-quickgelu"
    evaluate.main(["--ckpt", str(out), "--root", str(root), "--workers", "0", "--out", str(tmp_path / "eval"),
                   "--results", str(tmp_path / "r.jsonl"), "--save-embeddings"])
    saved = torch.load(tmp_path / "eval" / "embeddings.pt", weights_only=True)
    scenes = C.load_split("eurosat_ms", root, "test", 0)
    raw = C.ImageFiles(scenes)[saved["index"].tolist()]["images"]
    pixels = C.DATA["eurosat_ms"].pixels
    composite = C.rgb_composite(C.s2_bands(raw, pixels, "cpu"), pixels.rgb_max) / 255  # 32 px already: no resize
    with torch.no_grad():
        expected = teacher.encode_image((composite - 0.5) / 0.5)
    torch.testing.assert_close(saved["features"]["clip_rgb"], expected, atol=1e-5, rtol=1e-5)


def test_pretrained_none_prints_no_open_clip_warning(tmp_path, capfd, caplog, tiny_clip_config):
    C.load_clip(TINY_CLIP, "none")
    assert "No pretrained weights" not in capfd.readouterr().err + caplog.text


def test_uncached_weights_while_offline_fail_fast_in_one_line(monkeypatch, tiny_clip_config):
    import open_clip.pretrained as pretrained

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_CLIP, {"hubtag": {"hf_hub": "nobody/not-cached-here/",
                                                                      "quick_gelu": True}})
    started = time.time()
    with pytest.raises(C.UserError) as e:
        C.load_clip(TINY_CLIP, "hubtag")
    assert time.time() - started < 5
    message = str(e.value)
    assert "\n" not in message and "huggingface.co" in message and "--pretrained FILE" in message
    assert f"--model {TINY_CLIP}-quickgelu" in message  # OpenAI-style weights need the QuickGELU config
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_CLIP, {"hubtag": {"hf_hub": "nobody/not-cached-here/"}})
    with pytest.raises(C.UserError) as e:
        C.load_clip(TINY_CLIP, "hubtag")
    assert "--pretrained FILE" in str(e.value) and "quickgelu" not in str(e.value)  # other weights: no such hint


# ----------------------------------------------------------------------------- student checkpoints


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, tiny_clip_config):
    base = tmp_path_factory.mktemp("teacher")
    root = make_eurosat_ms(base / "ms", per_class=6)
    patch.main(run_args(TINY_CLIP, root, base / "patch", "--epochs", "1", "--alphas", "0"))
    return {"root": root, "folder": str(base / "patch")}


def student_backbone(seed):
    torch.manual_seed(seed)
    return C.Student("test_vit", 32, 32).backbone.state_dict()  # as TINY_STUDENT


def test_moco_checkpoint_loads_the_base_encoder(teacher_folder, tmp_path):
    base, momentum = student_backbone(1), student_backbone(2)
    ckpt = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in base.items()},
                           **{f"module.momentum_encoder.{k}": v for k, v in momentum.items()}}}
    torch.save(ckpt, tmp_path / "moco.pth")
    result = align.main(["--teacher", teacher_folder["folder"], "--root", teacher_folder["root"], *TINY_STUDENT,
                         "--epochs", "1", "--max-steps", "1", "--workers", "0", "--student-weights",
                         str(tmp_path / "moco.pth"), "--student-weights-bands", "eurosat", "--out", str(tmp_path / "a")])
    init = evaluate.load_student(str(tmp_path / "a" / "student_init.pt"))
    for k, v in base.items():
        assert torch.equal(init.backbone.state_dict()[k], v), k


def test_a_checkpoint_with_two_tensors_for_one_weight_is_refused(teacher_folder, tmp_path, capsys):
    base = student_backbone(1)
    torch.save({"module.blocks.0.norm1.weight": base["blocks.0.norm1.weight"], **base}, tmp_path / "two.pth")
    with pytest.raises(SystemExit) as e:
        align.main(["--teacher", teacher_folder["folder"], "--root", teacher_folder["root"], *TINY_STUDENT,
                    "--epochs", "1", "--workers", "0", "--student-weights", str(tmp_path / "two.pth"),
                    "--out", str(tmp_path / "b")])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "blocks.0.norm1.weight" in line and "module.blocks.0.norm1.weight" in line
    assert not os.path.exists(tmp_path / "b")


def test_dino_checkpoint_loads_its_teacher(teacher_folder, tmp_path):
    student_weights, teacher_weights = student_backbone(3), student_backbone(4)
    torch.save({"student": {f"module.backbone.{k}": v for k, v in student_weights.items()},
                "teacher": {f"backbone.{k}": v for k, v in teacher_weights.items()}}, tmp_path / "dino.pth")
    align.main(["--teacher", teacher_folder["folder"], "--root", teacher_folder["root"], *TINY_STUDENT,
                "--epochs", "1", "--max-steps", "1", "--workers", "0", "--student-weights", str(tmp_path / "dino.pth"),
                "--student-weights-bands", "eurosat", "--out", str(tmp_path / "c")])
    init = evaluate.load_student(str(tmp_path / "c" / "student_init.pt"))
    assert all(torch.equal(init.backbone.state_dict()[k], v) for k, v in teacher_weights.items())


def test_a_last_training_batch_of_one_image_is_left_out():
    """BatchNorm (ResNet CLIPs, CNN students) cannot train on one image: 13 images in batches of 4
    give 3 training batches (4, 4, 4), 14 give 4 (4, 4, 4, 2); evaluation keeps every image."""
    class Indices(torch.utils.data.Dataset):  # a batch is its indices (as ImageFiles': 'index' and 'bad')
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, indices):
            return {"index": torch.tensor(indices), "bad": []}
    assert C.training_batches(13, 4) == 3 and C.training_batches(14, 4) == 4 and C.training_batches(12, 4) == 3
    train = list(C.batch_loader(Indices(13), 4, train=True, seed=0))
    assert [len(b["index"]) for b in train] == [4, 4, 4]
    assert [len(b["index"]) for b in C.batch_loader(Indices(14), 4, train=True, seed=0)] == [4, 4, 4, 2]
    assert sum(len(b["index"]) for b in C.batch_loader(Indices(13), 4)) == 13
