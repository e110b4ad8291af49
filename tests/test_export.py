"""Export to HF transformers / timm and import back: the same numbers on the same pixels, both directions."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from deit_train.errors import ConfigError
from deit_train.export import canonical_timm_name, export
from deit_train.models import create_deit, forward_heads
from deit_train.models.hf_convert import hf_to_timm, timm_to_hf
from deit_train.models.simmim import SimMIM

try:
    import transformers
except ImportError:  # an optional extra: pip install -e ".[hf]"
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason='transformers not installed (pip install -e ".[hf]")')

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4.0,
            qkv_bias=True, drop_path_rate=0.0, layer_norm_eps=1e-6, num_channels=3)
CLASSES = ["cat", "dog", "fox", "owl", "yak"]
DATA = {"image_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "crop_pct": 0.875,
        "interpolation": "bicubic"}


def tiny_student(distilled: bool, num_classes: int = 5, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_deit(**{**TINY, **overrides}, num_classes=num_classes, distilled=distilled)
    for p in model.parameters():  # every weight visibly matters (timm zero-inits some)
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def model_config(distilled: bool, num_classes: int = 5) -> dict:
    return {"_target_": "deit_train.models.create_deit", **TINY, "num_classes": num_classes, "distilled": distilled,
            "pretrained": None, "init_from": None}


def save_run_checkpoint(path: Path, state: dict, prefix: str, config: dict, class_names=CLASSES, data=DATA) -> Path:
    """What a training run writes: Lightning's ``state_dict`` (module prefixes) + the run config StoreRunConfig adds."""
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}, "epoch": 0,
                "deit_train": {"model": config, "data": data, "class_names": class_names}}, path)
    return path


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- export -> transformers -------------------------------------------------------------------------------------
@needs_hf
def test_hf_export_of_distilled_student_loads_with_teacher_class(tmp_path, pixels):
    student = tiny_student(distilled=True)
    ckpt = save_run_checkpoint(tmp_path / "run.ckpt", student.state_dict(), "student.", model_config(True))
    result = export(ckpt, "hf", tmp_path / "hf")
    assert result["hf_class"] == "DeiTForImageClassificationWithTeacher"

    hf = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        cls, dist = forward_heads(student, pixels)
    torch.testing.assert_close(out.cls_logits, cls, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.distillation_logits, dist, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logits, (cls + dist) / 2, atol=1e-4, rtol=0)

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deit" and config["architectures"] == ["DeiTForImageClassificationWithTeacher"]
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASSES)}
    assert config["label2id"] == {name: i for i, name in enumerate(CLASSES)}
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (32, 2, 128)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@needs_hf
def test_hf_preprocessor_matches_eval_preprocessing(tmp_path):
    ckpt = save_run_checkpoint(tmp_path / "run.ckpt", tiny_student(True).state_dict(), "student.", model_config(True))
    export(ckpt, "hf", tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    # timm's eval transform for 32 px at crop_pct 0.875: short side to floor(32 / 0.875) = 36, center crop 32
    assert saved["size"] == {"shortest_edge": 36} and saved["crop_size"] == {"height": 32, "width": 32}
    assert saved["image_mean"] == DATA["mean"] and saved["image_std"] == DATA["std"]
    assert saved["resample"] == 3  # PIL bicubic
    # the processor applied to a non-square image gives our eval tensor up to resampling differences
    from deit_train.data.transforms import eval_transform

    image = Image.fromarray((torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(2)) * 255)
                            .to(torch.uint8).numpy())
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    theirs = processor(images=image, return_tensors="pt").pixel_values[0]
    ours = eval_transform(32, DATA["mean"], DATA["std"], DATA["crop_pct"])(image)
    assert theirs.shape == ours.shape == (3, 32, 32)
    assert (theirs - ours).abs().mean() < 0.1  # antialiasing differs a little; a wrong crop or norm gives ~1
    # a grey PNG becomes 3 channels as in training (without do_convert_rgb: a [1, 1, 32, 32] tensor)
    assert saved["do_convert_rgb"] is True
    grey_file = tmp_path / "grey.png"
    image.convert("L").save(grey_file)
    grey = processor(images=Image.open(grey_file), return_tensors="pt").pixel_values
    assert grey.shape == (1, 3, 32, 32)
    ours = eval_transform(32, DATA["mean"], DATA["std"], DATA["crop_pct"])(Image.open(grey_file).convert("RGB"))
    assert (grey[0] - ours).abs().mean() < 0.1


@needs_hf
def test_hf_export_of_cls_only_student_is_vit(tmp_path, pixels):
    student = tiny_student(distilled=False)
    ckpt = save_run_checkpoint(tmp_path / "run.ckpt", student.state_dict(), "student.", model_config(False))
    assert export(ckpt, "hf", tmp_path / "hf")["hf_class"] == "ViTForImageClassification"
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=pixels).logits, student(pixels), atol=1e-4, rtol=0)
    # DeiT's classes would add a distillation token this student never had: refused, with the alternative named
    with pytest.raises(ConfigError, match="ViTForImageClassification"):
        export(ckpt, "hf", tmp_path / "deit", hf_class="DeiTForImageClassification")


@needs_hf
def test_hf_export_class_head_only(tmp_path, pixels):
    student = tiny_student(distilled=True)
    ckpt = save_run_checkpoint(tmp_path / "run.ckpt", student.state_dict(), "student.", model_config(True))
    export(ckpt, "hf", tmp_path / "hf", hf_class="DeiTForImageClassification")
    hf = transformers.DeiTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=pixels).logits, forward_heads(student, pixels)[0], atol=1e-4,
                                   rtol=0)


@needs_hf
@pytest.mark.parametrize("distilled", [True, False])
def test_hf_export_of_simmim_checkpoint(tmp_path, pixels, distilled):
    torch.manual_seed(0)
    network = SimMIM(tiny_student(distilled, num_classes=0))
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.2)
    network.eval()
    ckpt = save_run_checkpoint(tmp_path / "mim.ckpt", network.state_dict(), "model.", model_config(distilled, 0),
                               class_names=[], data={"source": DATA})
    hf_class = "DeiTForMaskedImageModeling" if distilled else "ViTForMaskedImageModeling"
    assert export(ckpt, "hf", tmp_path / "hf")["hf_class"] == hf_class
    hf = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf").eval()
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        ours, theirs = network(pixels, mask), hf(pixel_values=pixels, bool_masked_pos=mask)
    torch.testing.assert_close(theirs.reconstruction, ours.reconstruction, atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs.loss, ours.loss, atol=1e-5, rtol=0)


def test_export_hf_without_transformers_says_how_to_install(tmp_path, monkeypatch):
    ckpt = save_run_checkpoint(tmp_path / "run.ckpt", tiny_student(True).state_dict(), "student.", model_config(True))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[hf\]"'):
        export(ckpt, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---- export -> timm ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [True, False])
def test_timm_export_loads_with_create_model(tmp_path, pixels, distilled):
    student = tiny_student(distilled)
    ckpt = save_run_checkpoint(tmp_path / "run.ckpt", student.state_dict(), "student.", model_config(distilled))
    result = export(ckpt, "timm", tmp_path / "timm")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["label_names"] == CLASSES
    assert config["pretrained_cfg"]["mean"] == DATA["mean"] and config["pretrained_cfg"]["crop_pct"] == 0.875
    # our weights, not timm's deit_tiny (tag fb_in1k, apache-2.0, Facebook's URL); a license only when given
    assert config["pretrained_cfg"]["tag"] == "deit_train"
    assert not {"license", "url", "hf_hub_id"} & set(config["pretrained_cfg"])
    export(ckpt, "timm", tmp_path / "licensed", license="cc-by-4.0")
    assert json.loads((tmp_path / "licensed" / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-4.0"
    overlay = {**config["pretrained_cfg"], "file": str(tmp_path / "timm" / "model.safetensors")}
    by_name = timm.create_model(result["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                **config["model_args"]).eval()
    by_dir = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    imported = create_deit(**TINY, num_classes=5, distilled=distilled, init_from=str(tmp_path / "timm")).eval()
    with torch.no_grad():
        expected = student(pixels)
        assert torch.equal(by_name(pixels), expected)
        assert torch.equal(by_dir(pixels), expected)
        assert torch.equal(imported(pixels), expected)  # and the directory starts a student (model.init_from)


def test_timm_export_picks_the_published_name_for_published_sizes():
    model = tiny_student(distilled=True)
    small = {"img_size": [224, 224], "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0}
    assert canonical_timm_name(model, small) == "deit_small_distilled_patch16_224"
    assert canonical_timm_name(model, {**small, "img_size": [384, 384]}) == "deit_tiny_distilled_patch16_224"  # none
    assert canonical_timm_name(tiny_student(distilled=False), {**small, "embed_dim": 768, "num_heads": 12,
                                                                "img_size": [384, 384]}) == "deit_base_patch16_384"


# ---- import: HF / timm -> model.init_from ----------------------------------------------------------------------
@needs_hf
def test_init_from_hf_directory_written_by_transformers(tmp_path, pixels):
    """A directory transformers itself wrote (not our export) starts a student that computes the same logits."""
    torch.manual_seed(0)
    config = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8, layer_norm_eps=1e-6, num_labels=4)
    hf = transformers.DeiTForImageClassificationWithTeacher(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.2)
    hf.save_pretrained(tmp_path / "hf")
    student = create_deit(**{**TINY, "mlp_ratio": 2.0}, num_classes=4, distilled=True, init_from=str(tmp_path / "hf"))
    with torch.no_grad():
        cls, dist = forward_heads(student.eval(), pixels)
        out = hf(pixel_values=pixels)
    torch.testing.assert_close(cls, out.cls_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(dist, out.distillation_logits, atol=1e-4, rtol=0)


@needs_hf
def test_init_from_hf_directory_at_another_resolution_matches_interpolate_pos_encoding(tmp_path):
    student = tiny_student(distilled=True)
    ckpt = save_run_checkpoint(tmp_path / "run.ckpt", student.state_dict(), "student.", model_config(True))
    export(ckpt, "hf", tmp_path / "hf")
    bigger = create_deit(**{**TINY, "image_size": 48}, num_classes=5, distilled=True,
                         init_from=str(tmp_path / "hf")).eval()
    assert bigger.pos_embed.shape == (1, 2 + 36, 32)
    hf = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # both resample the 4x4 grid bicubically to 6x6
        torch.testing.assert_close(forward_heads(bigger, images)[0],
                                   hf(pixel_values=images, interpolate_pos_encoding=True).cls_logits,
                                   atol=1e-4, rtol=0)


def test_init_from_timm_and_official_deit_files(tmp_path, pixels):
    source = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                               num_heads=2, num_classes=5).eval()
    torch.save({"model": source.state_dict()}, tmp_path / "official.pth")  # the official DeiT repo's layout
    student = create_deit(**TINY, num_classes=5, distilled=True, init_from=str(tmp_path / "official.pth")).eval()
    with torch.no_grad():
        assert torch.equal(student(pixels), source(pixels))


@needs_hf
def test_init_from_hf_key_mismatch_is_a_clear_error(tmp_path):
    student = tiny_student(distilled=True)
    ckpt = save_run_checkpoint(tmp_path / "run.ckpt", student.state_dict(), "student.", model_config(True))
    export(ckpt, "hf", tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"missing \['blocks\.2\.norm1\.weight'"):
        create_deit(**{**TINY, "num_hidden_layers": 3}, num_classes=5, distilled=True, init_from=str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"other shapes .*cls_token \(1, 1, 32\) vs model \(1, 1, 64\)"):
        create_deit(**{**TINY, "hidden_size": 64}, num_classes=5, distilled=True, init_from=str(tmp_path / "hf"))


def test_hf_key_mapping_round_trip_in_both_transformers_layouts():
    state = tiny_student(distilled=True).state_dict()
    for style in ("hub", "v5"):
        hf_state = timm_to_hf(state, "DeiTForImageClassificationWithTeacher", style)
        layer_key = ("deit.encoder.layer.0.attention.attention.query.weight" if style == "hub"
                     else "deit.layers.0.attention.q_proj.weight")
        # the query is the first third of timm's fused qkv projection
        assert torch.equal(hf_state[layer_key], state["blocks.0.attn.qkv.weight"][:32])
        back = hf_to_timm(hf_state)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("experiment", ["simmim_pretrain", "simmim_quickstart_pretrain"])
def test_simmim_pretraining_exports_as_vit_as_the_docs_say(experiment, tmp_path):
    """Pretraining encoders have no distillation token, so export picks ViTForMaskedImageModeling (transformers'
    DeiT would add one); the export docs name that class (issue 13 found the README naming DeiTForMaskedImageModeling)."""
    from conftest import ROOT, compose_config

    assert compose_config([f"experiment={experiment}"], tmp_path).model.distilled is False
    docs = (ROOT / "docs" / "export_inference.md").read_text()
    assert "`ViTForMaskedImageModeling`" in docs and "DeiTForMaskedImageModeling" not in docs
