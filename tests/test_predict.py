"""Prediction CLI: top-k per head, attention rollout PNGs, other resolutions; and a trained run end to end."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

from deit_train import export as export_cli
from deit_train import predict as predict_cli
from deit_train.run.cli import run_main
from deit_train.data.transforms import eval_transform
from deit_train.errors import ConfigError
from deit_train.models import create_deit, forward_heads
from deit_train.predict import attention_rollout, capture_attention, predict
from deit_train.run.trained_model import CHECKPOINT_KEY, load_trained_model

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4.0,
            qkv_bias=True, drop_path_rate=0.0, layer_norm_eps=1e-6, num_channels=3)
CLASSES = ["circle", "square", "stripe"]
DATA = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0}


def cli(tool, argv: list[str]) -> None:
    """``python -m deit_train.<tool> argv`` in this process (same parsing and error handling)."""
    run_main(tool.main, tool.DEFAULTS, tool.USAGE, argv=argv)


@pytest.fixture
def distilled_ckpt(tmp_path):
    torch.manual_seed(0)
    model = create_deit(**TINY, num_classes=3, distilled=True)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    config = {"_target_": "deit_train.models.create_deit", **TINY, "num_classes": 3, "distilled": True,
              "pretrained": None, "init_from": None}
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in model.state_dict().items()},
                CHECKPOINT_KEY: {"model": config, "data": DATA, "class_names": CLASSES}}, path)
    return path, model.eval()


@pytest.fixture
def image_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate([(32, 32), (40, 56), (64, 48)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_attention_rollout_hand_computed():
    # one layer, one head, tokens (cls, p1, p2): cls attends 0.8 / 0.2 to the patches
    attn = torch.tensor([[[[0.0, 0.8, 0.2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    # (A + I) / 2 row 0 = (1, 0.8, 0.2) / 2
    torch.testing.assert_close(attention_rollout([attn], num_prefix_tokens=1), torch.tensor([[0.4, 0.1]]))
    # a second, uniform layer: row 0 of U @ R with R's rows (0.5,0.4,0.1), (0,1,0), (0,0,1), U = (A+I)/2, A = 1/3
    uniform = torch.full((1, 1, 3, 3), 1 / 3)
    mixed = (uniform[0, 0] + torch.eye(3)) / 2
    first = torch.tensor([[0.5, 0.4, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    expected = (mixed @ first)[0, 1:]
    torch.testing.assert_close(attention_rollout([attn, uniform], 1)[0], expected)


def test_capture_attention_gives_softmax_qk_and_restores_sdpa():
    torch.manual_seed(0)
    model = create_deit(**TINY, num_classes=3, distilled=True).eval()
    x = torch.randn(2, 3, 32, 32)
    fused_before = [b.attn.fused_attn for b in model.blocks]
    with torch.no_grad():
        reference = forward_heads(model, x)[0]
        with capture_attention(model) as maps:
            captured_logits = forward_heads(model, x)[0]
        # block 0's attention by hand from its own weights
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        q, k, _ = model.blocks[0].attn.qkv(model.blocks[0].norm1(tokens)).reshape(2, 18, 3, 2, 16).permute(2, 0, 3, 1, 4)
        by_hand = (q @ k.transpose(-2, -1) / math.sqrt(16)).softmax(-1)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 18, 18)
    torch.testing.assert_close(maps[0], by_hand)
    torch.testing.assert_close(captured_logits, reference, atol=1e-5, rtol=0)
    assert [b.attn.fused_attn for b in model.blocks] == fused_before


def test_predict_top_k_per_head_and_attention_png(distilled_ckpt, image_files, tmp_path):
    ckpt, model = distilled_ckpt
    records = predict(ckpt, [str(p) for p in image_files], top_k_count=2, attention=True, out=tmp_path / "out")
    assert [r["image"] for r in records] == [str(p) for p in image_files]
    transform = eval_transform(32, DATA["mean"], DATA["std"], crop_pct=1.0)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in image_files])
    with torch.no_grad():
        cls, dist = forward_heads(model, pixels)
    for i, record in enumerate(records):
        for head, logits in (("prediction", (cls + dist) / 2), ("cls_head", cls), ("dist_head", dist)):
            probs = logits[i].softmax(-1)
            best = probs.argsort(descending=True)[:2]
            assert [r["label"] for r in record[head]] == [CLASSES[j] for j in best]
            assert [r["probability"] for r in record[head]] == pytest.approx(probs[best].tolist(), abs=1e-5)
        png = Image.open(record["attention"])
        assert png.size == (32, 32) and png.mode == "RGB"
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert saved == records


def test_predict_at_another_resolution_and_from_a_folder(distilled_ckpt, image_files, tmp_path):
    ckpt, _ = distilled_ckpt
    records = predict(ckpt, str(image_files[0].parent), top_k_count=3, image_size=48, attention=True,
                      out=tmp_path / "out48")
    assert len(records) == 3
    assert all(Image.open(r["attention"]).size == (48, 48) for r in records)
    assert all(sum(x["probability"] for x in r["prediction"]) == pytest.approx(1.0, abs=1e-5) for r in records)
    trained = load_trained_model(ckpt, image_size=48)
    assert trained.model.pos_embed.shape == (1, 2 + 36, 32)


def test_predict_errors_are_one_line(distilled_ckpt, tmp_path, capsys):
    ckpt, _ = distilled_ckpt
    with pytest.raises(ConfigError, match="neither an image file nor a folder"):
        predict(ckpt, [str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image files"):
        predict(ckpt, str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_info:
        cli(predict_cli, [f"ckpt={ckpt}", "images=[x.png]", "topk=3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown option 'topk'")


def test_trained_run_exports_and_predicts_from_the_checkpoint_alone(tmp_path, trained_run, capsys):
    """Train (1 short epoch) -> the checkpoint carries its config -> predict and export CLIs use it."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.dir, run_dir)  # the session's run (a bare checkpoint is written next to its own)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)[CHECKPOINT_KEY]
    assert stored["model"]["image_size"] == 16 and stored["model"]["distilled"] is True
    assert stored["class_names"] == [str(i) for i in range(10)] and stored["data"]["mean"] == [0.5, 0.5, 0.5]

    digits = load_digits()
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16)).save(folder / f"d{i}.png")
    cli(predict_cli, [f"ckpt={ckpt}", f"images={folder}", "top_k=2", "--attention", f"out={tmp_path / 'pred'}"])
    printed = capsys.readouterr().out
    assert "prediction" in printed and "dist_head" in printed
    assert (tmp_path / "pred" / "d0_attention.png").is_file() and (tmp_path / "pred" / "d1_attention.png").is_file()

    cli(export_cli, [f"ckpt={ckpt}", "format=timm", f"out={tmp_path / 'timm'}"])
    exported = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert exported.patch_embed.img_size == (16, 16) and exported.pretrained_cfg["label_names"][:2] == ["0", "1"]

    # a checkpoint without the stored config falls back to <run_dir>/.hydra/config.yaml
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    del checkpoint[CHECKPOINT_KEY]
    torch.save(checkpoint, run_dir / "checkpoints" / "bare.ckpt")
    bare, full = load_trained_model(run_dir / "checkpoints" / "bare.ckpt"), load_trained_model(ckpt)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(bare.model(x), full.model(x))
        assert torch.equal(exported(x), full.model(x))
    assert bare.preprocessing == full.preprocessing


def test_predict_names_a_bad_file_skips_it_on_request_and_keeps_equal_names_apart(distilled_ckpt, tmp_path):
    ckpt, model = distilled_ckpt
    folder = tmp_path / "photos"
    rng = np.random.default_rng(1)
    for sub in ("a", "b"):  # the same file name in two folders
        (folder / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / sub / "x.png")
    # fully transparent RGBA: training's load_rgb composites it over white; PIL's convert("RGB") would give black
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(folder / "a" / "clear.png")
    good = (folder / "a" / "x.png").read_bytes()
    (folder / "b" / "broken.png").write_bytes(good[: len(good) // 2])

    with pytest.raises(ConfigError) as error:
        predict(ckpt, str(folder), batch_size=8)
    message = str(error.value)
    assert "broken.png" in message and "skip_bad=true" in message and "x.png" not in message

    out = tmp_path / "out"
    records = predict(ckpt, str(folder), top_k_count=3, attention=True, out=out, batch_size=8, skip_bad=True)
    assert [r["image"] for r in records] == [str(folder / p) for p in ("a/clear.png", "a/x.png", "b/broken.png",
                                                                       "b/x.png")]
    assert set(records[2]) == {"image", "skipped"} and records[2]["skipped"]
    assert json.loads((out / "predictions.json").read_text()) == records
    assert records[1]["attention"] == str(out / "a" / "x_attention.png")
    assert records[3]["attention"] == str(out / "b" / "x_attention.png")
    assert (out / "a" / "x_attention.png").is_file() and (out / "b" / "x_attention.png").is_file()

    transform = eval_transform(32, DATA["mean"], DATA["std"], crop_pct=1.0)
    with torch.no_grad():
        cls, dist = forward_heads(model, transform(Image.new("RGB", (32, 32), (255, 255, 255)))[None])
    probs = ((cls + dist) / 2)[0].softmax(-1)
    assert [r["probability"] for r in records[0]["prediction"]] == pytest.approx(
        probs.sort(descending=True).values.tolist(), abs=1e-5)
