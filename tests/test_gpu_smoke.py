"""scripts/gpu_smoke.py in its reduced CPU form (tiny student, tiny teacher, two steps an epoch), so that the GPU
smoke check runs end to end wherever the tests run and cannot rot before a GPU is at hand."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_smoke  # noqa: E402

ROWS = ["plain", "distill", "compiled", "ema", "cache write", "cache read", "fp16 + clip"]
# of the data path's rows, the two that run all of it (the other three are their parts, trained under every precision
# by test_gpu_paths): a tiny form of every row would add a minute to the suite
JPEG_ROWS = ["pack bf16-true", "decode under load"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, "scripts/gpu_smoke.py", "--tiny", "--json", str(out / "smoke.json"),
                           "--keep", str(out / "runs"), "--rows", ",".join(ROWS + JPEG_ROWS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    return proc, json.loads((out / "smoke.json").read_text()), out / "runs"


def test_every_row_runs_and_the_table_reports_it(smoke):
    proc, results, runs = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = ROWS + JPEG_ROWS
    assert [r["name"] for r in results] == names  # no DDP row without two GPUs
    table = proc.stdout[proc.stdout.index("| row |"):].splitlines()
    assert len(table) == 2 + len(names) and all(line.startswith(f"| {name} | 0 |")
                                                for line, name in zip(table[2:], names))
    for r in results:
        assert r["exit"] == 0 and r["error"] is None, r
        assert r["img_s"] > 0 and r["peak_mb"] > 0 and r["peak_kind"] == "rss", r
        # each training step went through the probe; host syncs are CUDA's to count (n/a in the table)
        assert r["steps"] == 2 and r["syncs_per_step"] is None and "| n/a |" in table[2 + names.index(r["name"])], r
        # the JPEG rows compared their device stage (decode under load: its decoded crops) with the CPU's, batch
        # by batch (on the CPU the "device" is the CPU: 0 levels, which the GPU form measures against)
        assert (r["compared"], r["max_diff"]) == ((2, 0) if r["name"] in JPEG_ROWS else (0, None)), r
        distilled = r["name"] != "plain"
        # the teacher's start-up line and the token diagnostics' curve exist exactly for the distilled rows
        # teacher.precision=auto: bf16 on a CPU with AVX512-BF16/AMX, else fp32
        assert r["teacher"] in (("cpu/bf16/channels_last", "cpu/fp32/channels_last") if distilled else (None,)), r
        assert r["cosine"] is (True if distilled else None), r
    compiled = next(r for r in results if r["name"] == "compiled")
    assert compiled["recompiles"] >= 0 and all(r["recompiles"] == 0 for r in results if r is not compiled)
    # the cache rows wrote, then read, the teacher's logits
    assert any((runs / "logit_cache").rglob("*.npy"))


def test_a_failing_row_is_reported_not_fatal(tmp_path):
    teacher = gpu_smoke.random_teacher_file(tmp_path / "teacher.pth", "regnetx_002")
    common = gpu_smoke.common_overrides(tiny=True, steps=1, batch_size=2)
    result = gpu_smoke.measure(gpu_smoke.Row("broken", ["trainer.precision=bogus"]), common, teacher, tmp_path)
    assert result["exit"] != 0 and result["error"] and result["img_s"] is None and result["cosine"] is False
    line = gpu_smoke.table([result]).splitlines()[2]
    assert line.startswith(f"| broken | {result['exit']} |") and "broken failed:" in gpu_smoke.table([result])
