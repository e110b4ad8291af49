"""DDP on CPU (gloo, 2 processes started by Lightning): metrics synced across ranks, global batch and lr rule."""
import json

import pytest
import yaml

from conftest import run_cli


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _hparams(run_dir):
    return yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())


def test_two_process_ddp_evaluates_like_one_process(tmp_path, trained_run):
    """The same checkpoint tested on 1 and on 2 gloo processes gives identical top-1 (student heads and teacher).

    Without the cross-rank sync each rank would report the accuracy on its own half of the test split.
    """
    # the session's one-process run tested the full digits test split (270 images: 135 per rank, so the
    # distributed sampler pads nothing)
    single = trained_run.dir
    assert "trainer.limit_test_batches=1.0" == [a for a in trained_run.args if "limit_test_batches" in a][-1]
    last = single / "checkpoints" / "last.ckpt"

    # resumes after its only epoch, so nothing trains: it tests exactly the single run's weights
    ddp = run_cli([*trained_run.args, "strategy=ddp_cpu", "trainer.devices=2", f"ckpt_path={last}"],
                  tmp_path / "ddp", tmp_path / "cache")
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = _results(single), _results(tmp_path / "ddp")
    keys = ["test/top1", "test/top1_cls", "test/top1_dist", "test/top5", "teacher/test_top1", "test/agreement",
            "test/disagree_teacher_cls", "test/disagree_cls_dist", "test/disagree_dist_pred"]
    assert {k: two[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, abs=1e-6)

    # global batch = 16 per device x 2 devices; lr = base_lr (quickstart 1.6e-2) x 32 / 512
    assert _hparams(single)["optim/global_batch"] == 16
    assert _hparams(tmp_path / "ddp")["optim/global_batch"] == 32
    assert _hparams(tmp_path / "ddp")["optim/lr"] == pytest.approx(1.6e-2 * 32 / 512)
    assert _hparams(tmp_path / "ddp")["trainer"]["strategy"]["process_group_backend"] == "gloo"


@pytest.mark.parametrize("strategy", ["auto", "single", "ddp", "ddp_cpu", "fsdp"])
def test_strategy_group_sets_the_trainer(tmp_path, strategy):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from timm.models.vision_transformer import Block

    from conftest import compose_config

    devices = [] if strategy == "single" else ["trainer.devices=2"]
    trainer = compose_config([f"strategy={strategy}", *devices], tmp_path).trainer
    if strategy in ("auto", "single"):
        assert trainer.strategy == "auto" and trainer.devices == (1 if strategy == "single" else 2)
        return
    built = instantiate(trainer.strategy)
    if strategy == "fsdp":
        assert isinstance(built, FSDPStrategy)
        assert built.kwargs["auto_wrap_policy"]._module_classes == {Block}  # one FSDP unit per transformer block
        assert built.kwargs["use_orig_params"]  # frozen teacher and trainable student may share a unit
    else:
        assert isinstance(built, DDPStrategy) and built._ddp_kwargs == {"find_unused_parameters": False,
                                                                        **({"gradient_as_bucket_view": True}
                                                                           if strategy == "ddp" else {})}
        assert built._process_group_backend == ("gloo" if strategy == "ddp_cpu" else None)
        assert trainer.accelerator == ("cpu" if strategy == "ddp_cpu" else "auto")
