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
# of the data path's rows, the one that runs all of it (the pack, device decode, device RandAugment, erasing and the
# decoded crops compared with the CPU's): its parts train under every *-true precision in test_gpu_paths, the stage
# comparison of the other rows is checked in this process below; a tiny form of every row would add a minute
JPEG_ROWS = ["decode under load"]


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
        # the decode row compared its decoded crops with the CPU decode, batch by batch (on the CPU the "device" is
        # the CPU: 0 levels, which the GPU form measures against)
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



def test_the_stage_comparison_measures_grey_levels_against_the_cpu_run_of_the_same_batch(monkeypatch):
    """scripts/smoke_probe.py's compare=stage (the JPEG rows): the device stage's output against the same stage run on
    the CPU copy of the batch, in grey levels, for the first two batches only. Here the "device" run is made one
    normalised unit off in one pixel of channel 0: std[0] x 255 = 63.75 levels."""
    import smoke_probe
    import torch

    from deit_train.data.device_augment import DeviceFinish, DeviceImages

    finish = DeviceFinish((0.5, 0.5, 0.5), (0.25, 0.5, 0.2))
    batch = DeviceImages(torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4), {})
    exact, original, runs = finish(batch), DeviceFinish.__call__, []

    def device_one_unit_off(self, images):  # the comparison runs the device's call first, then the CPU's
        out = original(self, images)
        runs.append(None)
        if len(runs) % 2:
            out[0, 0, 0, 0] += 1.0
        return out

    monkeypatch.setattr(DeviceFinish, "__call__", device_one_unit_off)
    stats = {"compared": 0, "max_diff": None}
    smoke_probe._compare_stage(stats)
    first = finish(batch)
    assert stats["compared"] == 1 and stats["max_diff"] == pytest.approx(63.75, abs=1e-4)
    assert first[0, 0, 0, 0] != exact[0, 0, 0, 0] and torch.equal(first.flatten()[1:], exact.flatten()[1:])
    finish(batch), finish(batch)
    assert stats["compared"] == 2 and len(runs) == 5  # the third batch is not compared: one run
