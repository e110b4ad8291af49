"""Every ``debug=`` config runs end to end on a cheap experiment (digits, a tiny student), not only composes; in
process, through the CLI's own entry (exit status and console as a process's)."""
from __future__ import annotations

import pytest

from conftest import ROOT, run_cli_in_process

DEBUG_CONFIGS = sorted(path.stem for path in (ROOT / "configs" / "debug").glob("*.yaml"))
# the quickstart at 16 px with a 2-block student on a fifth of the digits; the debug configs keep their own
# trainer settings
TINY = ["model.image_size=16", "model.patch_size=4", "model.hidden_size=32", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "data.batch_size=64", "data.train_fraction=0.2"]
# overfit's 20 epochs on 3 batches: 2 show the same path (a second epoch on the same batches) at a tenth of the time
SHORTER = {"overfit": ["trainer.max_epochs=2"]}


def test_every_debug_config_is_covered():
    assert {"default", "fdr", "limit", "overfit", "profiler"} <= set(DEBUG_CONFIGS)


@pytest.mark.parametrize("debug", DEBUG_CONFIGS)
def test_debug_config_runs_end_to_end(tmp_path, digits_teacher_file, debug):
    proc = run_cli_in_process(["experiment=quickstart", f"debug={debug}", f"teacher.checkpoint={digits_teacher_file}",
                    "teacher.min_val_top1=0", *TINY, *SHORTER.get(debug, [])], tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    if debug != "fdr":  # fast_dev_run writes no checkpoints, logs or results by design
        assert (tmp_path / "run" / "results.json").is_file()


def test_overfit_batches_sampler_indices_are_seeded_per_index():
    """Lightning's overfit_batches replaces the seeded sampler with a SequentialSampler: plain indices reach the
    dataset, and each index gets its own seed (the same augmented image in every epoch)."""
    import torch
    from torch.utils.data import Dataset

    from deit_train.data.stream import SeededDataset, index_seed

    class Draws(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(1).item()  # a transform's draw from torch's global generator

    data = SeededDataset(Draws(), seed=7)
    assert [data[i] for i in range(4)] == [data[i] for i in range(4)]  # same draws again (next epoch)
    assert len({data[i] for i in range(4)}) == 4
    assert data[2] == data[(2, index_seed(7, 2))] != SeededDataset(Draws(), seed=8)[2]
