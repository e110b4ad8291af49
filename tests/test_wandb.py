"""W&B tracking: automatic offline mode, the run recorded with config and metrics, read back by compare_runs."""
import runpy
import socket
import sys

import pytest

from conftest import FAST_DIGITS, ROOT, run_cli
from deit_train.compare.runs import find_runs, load_wandb_offline
from deit_train.compare.statistics import summary_rows
from deit_train.run.loggers import offline_reason, run_name

FAKE_KEY = "0123456789abcdef-not-a-real-key"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_offline_reason(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert offline_reason() == "no WANDB_API_KEY in the environment"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    port = _closed_port()
    assert offline_reason(f"http://127.0.0.1:{port}") == f"127.0.0.1:{port} unreachable (ConnectionRefusedError)"
    with socket.socket() as server:  # a server that answers: online
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert offline_reason(f"http://127.0.0.1:{server.getsockname()[1]}") is None


def test_run_name_keeps_what_changes_training():
    overrides = ["experiment=quickstart", "distill=soft", "hydra.run.dir=/x", "paths.log_dir=/y",
                 "trainer.enable_progress_bar=false", "logger=wandb", "model.hidden_size=64"]
    assert run_name("quickstart", overrides) == "quickstart,distill=soft,model.hidden_size=64"


def test_offline_run_read_back_by_compare_runs(tmp_path, digits_teacher_file, monkeypatch, capsys):
    """A key but no reachable server: offline, one line about it, and the key never lands in the run dir."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trained = ["distill=soft", f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0",
               "trainer.max_epochs=2", *FAST_DIGITS]
    proc = run_cli(["experiment=quickstart", "logger=[csv,wandb]", *trained], run_dir, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline_lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "wandb: logging offline" in line]
    assert len(offline_lines) == 1 and "unreachable" in offline_lines[0] and "wandb sync" in offline_lines[0]

    offline_dirs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_dirs) == 1
    wandb_run = load_wandb_offline(offline_dirs[0])
    assert wandb_run.name == ",".join(["quickstart", *trained])  # logger / hydra / progress bar left out
    assert wandb_run.config["wandb.group"] == "quickstart"
    assert {"model=deit_digits", "teacher=regnetx_002_digits", "distill=soft"} <= set(wandb_run.config["wandb.tags"])
    # the full resolved config and the resolved lr: quickstart base lr 1.6e-2 x batch 16 / 512
    assert wandb_run.config["distill"]["distill_type"] == "soft"
    assert wandb_run.config["model"]["hidden_size"] == 32
    assert wandb_run.config["optim/lr"] == pytest.approx(1.6e-2 * 16 / 512)

    # the same epochs and values as the CSV log of the same run
    from_csv = find_runs([run_dir], source="csv")[0]
    assert sorted(wandb_run.epochs) == sorted(from_csv.epochs) == [0, 1]
    for key in ("val/top1", "val/top1_cls", "val/top1_dist", "teacher/val_top1"):
        epochs, values = wandb_run.curve(key)
        assert epochs == from_csv.curve(key)[0] and values == pytest.approx(from_csv.curve(key)[1]), key
    row = summary_rows([wandb_run])[0]
    assert row["top-1 final"] == from_csv.epochs[1]["val/top1"]
    assert row["top-1 best"] == max(from_csv.curve("val/top1")[1])
    assert row["test top-1"] == pytest.approx(from_csv.summary["test/top1"])

    # the key is never written anywhere in the run directory
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path

    png = tmp_path / "curves.png"
    script = ROOT / "scripts" / "compare_runs.py"  # run as a script, in this process
    monkeypatch.setattr(sys, "argv", [str(script), str(run_dir), "--source", "wandb", "--out", str(png)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr()
    assert exit_info.value.code == 0, printed.err
    assert f"{row['top-1 final']:.4f}" in printed.out and "config differences" not in printed.out  # one run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
