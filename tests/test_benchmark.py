"""Benchmark CLI: every combination measured or skipped with a reason; JSON and markdown written."""
from __future__ import annotations

import json

import pytest
import torch

from deit_train import benchmark
from deit_train.run.cli import run_main
from deit_train.errors import ConfigError
from deit_train.models import create_deit, forward_heads

TINY = ["model_overrides.patch_size=8", "model_overrides.hidden_size=32", "model_overrides.num_hidden_layers=2",
        "model_overrides.num_attention_heads=2"]


def test_benchmark_tiny_config_writes_json_and_markdown(tmp_path, capsys):
    argv = ["models=[deit_tiny]", "image_size=32", *TINY, "num_classes=10", "batch_sizes=[2,4]",
            "precisions=[fp32,fp16]", "steps=2", "warmup=1", "device=cpu", f"out={tmp_path}"]
    run_main(benchmark.main, benchmark.DEFAULTS, benchmark.USAGE, argv=argv)
    report = json.loads((tmp_path / "benchmark.json").read_text())
    rows = report["results"]
    # 2 modes x 2 precisions x 2 attention implementations x 2 batch sizes
    assert len(rows) == 16
    assert {(r["mode"], r["precision"], r["attention"], r["batch_size"]) for r in rows} == {
        (m, p, a, b) for m in ("inference", "train") for p in ("fp32", "fp16") for a in ("sdpa", "eager") for b in (2, 4)}
    measured = [r for r in rows if "skipped" not in r]
    assert {r["precision"] for r in measured} == {"fp32"}  # CPU has no fp16 autocast: skipped, with the reason
    assert all("fp16" in r["skipped"] for r in rows if r["precision"] == "fp16")
    for row in measured:
        assert row["images_per_s"] > 0 and row["peak_memory_mb"] is None  # no allocator statistics on CPU
        assert row["images_per_s"] == pytest.approx(row["batch_size"] * 1000 / row["ms_per_step"])
        # 32-dim, 2-layer DeiT with distillation token and 10-class heads
        assert row["params_m"] == pytest.approx(sum(p.numel() for p in create_deit(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_classes=10,
            distilled=True).parameters()) / 1e6)
    for row in (r for r in measured if r["attention"] == "sdpa"):
        eager = next(r for r in measured if r["attention"] == "eager" and
                     (r["mode"], r["batch_size"], r["precision"]) == (row["mode"], row["batch_size"], row["precision"]))
        assert row["sdpa_speedup"] == pytest.approx(row["images_per_s"] / eager["images_per_s"])
    table = (tmp_path / "benchmark.md").read_text()
    assert table == capsys.readouterr().out.split("written:")[0].rstrip("\n") + "\n"
    assert table.count("| deit_tiny |") == 16 and "SDPA speed-up" in table


def test_attention_switch_changes_the_path_not_the_numbers():
    torch.manual_seed(0)
    model = create_deit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_classes=3, distilled=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        benchmark.set_attention(model, "eager")
        assert not any(b.attn.fused_attn for b in model.blocks)
        eager = forward_heads(model, x)[0]
        benchmark.set_attention(model, "sdpa")
        assert all(b.attn.fused_attn for b in model.blocks)
        torch.testing.assert_close(forward_heads(model, x)[0], eager, atol=1e-5, rtol=0)


def test_benchmark_rejects_unknown_names():
    with pytest.raises(ConfigError, match="no model config 'deit_huge'"):
        benchmark.model_config("deit_huge", None, True, 10)
    with pytest.raises(ConfigError, match="not a DeiT config"):
        benchmark.model_config("regnetx_002", None, True, 10)
    with pytest.raises(ConfigError, match="model_overrides.depth is not a field"):
        benchmark.model_config("deit_tiny", 32, True, 10, {"depth": 2})
    with pytest.raises(ConfigError, match="precisions: int8"):
        benchmark.precision_supported("int8", torch.device("cpu"))
