"""compare_runs as typed from a project folder: relative paths, and no argument = ./outputs and ./multirun."""
from __future__ import annotations

from pathlib import Path

from deit_train.compare.cli import main
from deit_train.compare.runs import find_runs


def write_run(run_dir: Path, top1: list[float]) -> None:
    (run_dir / "csv").mkdir(parents=True)
    lines = ["epoch,step,val/top1"] + [f"{epoch},{epoch * 10},{value}" for epoch, value in enumerate(top1)]
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_relative_folder_with_two_runs_and_the_no_argument_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(Path("outputs/quickstart/2026-01-01_10-00-00"), [0.5, 0.625])
    write_run(Path("outputs/quickstart/2026-01-01_11-00-00"), [0.25, 0.75])
    write_run(Path("multirun/sweep/0"), [0.125])

    runs = find_runs([Path("outputs/quickstart")])  # a relative folder of two runs (crashed: not in the subpath)
    assert [r.name for r in runs] == ["2026-01-01_10-00-00", "2026-01-01_11-00-00"]
    assert [r.curve("val/top1")[1] for r in runs] == [[0.5, 0.625], [0.25, 0.75]]

    assert main(["--out", "cmp.png"]) == 0
    printed = capsys.readouterr().out
    for name in ("outputs/quickstart/2026-01-01_10-00-00", "outputs/quickstart/2026-01-01_11-00-00",
                 "multirun/sweep/0"):
        assert name in printed
    assert "0.6250" in printed and "0.1250" in printed and Path("cmp.png").stat().st_size > 0


def test_no_runs_here_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no runs found in outputs multirun") and "\n" not in err
