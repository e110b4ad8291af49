"""Student backbones: the paper's sizes have the paper's parameter counts; custom sizes are config only."""
import pytest
import torch
from hydra.utils import instantiate

from deit_train.errors import ConfigError
from deit_train.models import create_deit, forward_heads, is_distilled

from conftest import compose_config

# Parameter counts of the published DeiT models (timm's deit_*_patch16_* with 1000 classes).
PAPER_COUNTS = {
    ("deit_tiny", False): 5_717_416, ("deit_tiny", True): 5_910_800,
    ("deit_small", False): 22_050_664, ("deit_small", True): 22_436_432,
    ("deit_base", False): 86_567_656, ("deit_base", True): 87_338_192,
    ("deit_base_384", False): 86_859_496, ("deit_base_384", True): 87_630_032,
}


@pytest.mark.parametrize("name,distilled", list(PAPER_COUNTS))
def test_model_config_builds_with_paper_parameter_count(name, distilled, tmp_path):
    cfg = compose_config([f"model={name}", "data=imagefolder", f"distill={'hard' if distilled else 'none'}",
                          "data.num_classes=1000"], tmp_path)
    with torch.device("meta"):  # shapes only: fast and memory-free
        model = instantiate(cfg.model)
    assert is_distilled(model) == distilled
    assert sum(p.numel() for p in model.parameters()) == PAPER_COUNTS[(name, distilled)]


def test_custom_size_from_overrides(tmp_path):
    cfg = compose_config(["model=deit_tiny", "model.hidden_size=48", "model.num_hidden_layers=3",
                          "model.num_attention_heads=4", "model.image_size=64", "model.patch_size=8",
                          "model.mlp_ratio=2", "model.num_channels=1", "model.layer_norm_eps=1e-5"], tmp_path)
    model = instantiate(cfg.model)
    assert model.embed_dim == 48 and len(model.blocks) == 3 and model.blocks[0].attn.num_heads == 4
    assert model.patch_embed.grid_size == (8, 8) and model.blocks[0].mlp.fc1.out_features == 96
    assert model.norm.eps == 1e-5 and model.num_classes == 10  # digits is the default data
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_attention_runs_through_sdpa():
    model = create_deit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert model.blocks[0].attn.fused_attn


def test_forward_heads_returns_both_heads_in_eval_and_train():
    model = create_deit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_classes=7, distilled=True)
    x = torch.randn(3, 3, 32, 32)
    for mode in (True, False):
        model.train(mode)
        cls, dist = forward_heads(model, x)
        assert cls.shape == dist.shape == (3, 7)
    model.eval()
    assert torch.allclose(model(x), (cls + dist) / 2, atol=1e-6)  # timm's eval prediction is the head average


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"model.image_size=100 is not divisible by model.patch_size=16"):
        create_deit(image_size=100)


def test_heads_not_dividing_hidden_size_is_a_clear_error():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        create_deit(hidden_size=100, num_attention_heads=3)
