"""scripts/benchmark_data.py: every data path's per-core rate, its ratio to today's folder path and the cores an
8-GPU node needs, as JSON and markdown."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PATHS = ["decode", "decode+crop+flip", "+RandAugment", "folder (deit, today)", "folder + uint8 workers",
         "folder + device RandAugment (CPU share)", "shards (deit, today)", "shards + uint8 workers",
         "shards + device RandAugment (CPU share)", "device stage (CPU tensors)", "folder + device decode (CPU share)",
         "shards + device decode (CPU share)", "device stage with decode (CPU tensors)"]


def test_benchmark_data_writes_every_paths_rate_ratio_and_node_cores(tmp_path):
    out_json, out_md = tmp_path / "data.json", tmp_path / "data.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "scripts/benchmark_data.py", "--num-images", "3", "--rounds", "1",
                    "--max-side", "600", "--device-batch", "4", "--gpu-rate", "1000", "--json", str(out_json),
                    "--markdown", str(out_md)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    result = json.loads(out_json.read_text())
    rows = {row["path"]: row for row in result["rows"]}
    assert set(PATHS) <= set(rows)
    reference = rows["folder (deit, today)"]["img_per_s_per_core"]
    for row in rows.values():
        assert row["img_per_s_per_core"] > 0
        assert row["ratio"] == pytest.approx(row["img_per_s_per_core"] / reference)
        assert row["cores_per_8_gpu_node"] == pytest.approx(8 * 1000 / row["img_per_s_per_core"])
    assert result["pack_img_per_s"] > 0
    table = out_md.read_text()
    assert "| shards + device RandAugment (CPU share) |" in table and "cores/node" in table
    assert "| shards + device decode (CPU share) |" in table
