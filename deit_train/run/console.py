"""A console that shows what the user can act on.

:func:`quiet_console` silences, once per process (every DDP rank runs it; Lightning's warnings come from rank 0
only), the library messages below: each is either about a choice this framework makes on purpose or about the
libraries' own internals. Every other warning still shows. :class:`ModelSummary` is Lightning's model summary
without the FLOPs it did not count.
"""
from __future__ import annotations

import logging
import re
import warnings

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks.model_summary import log as summary_log
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

# warnings.warn messages (regular expressions matched at the start of the message)
SILENCED_WARNINGS = (
    # the teacher is frozen in eval mode on purpose (its BatchNorm statistics never move)
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Slurm's tools are installed but this process runs outside a job (a login node, a workstation)
    r"The `srun` command is available on your system but is not used",
    # Lightning's own use of a torch pytree API that torch deprecated
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # data.pin_memory=true on a machine without GPU: nothing is pinned and nothing goes wrong
    r"'pin_memory' argument is set as true but no accelerator is found",
    # epochs shorter than trainer.log_every_n_steps (small data sets): the epoch-level curves are logged anyway
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # epoch-level train metrics are each rank's own mean on purpose; val/test metrics sync through torchmetrics
    r"It is recommended to use `self.log\('train/",
    # augment.device_decode decodes with torchvision.io.decode_jpeg, which torchvision 0.29 deprecates in favour of
    # TorchCodec; it still decodes bit-identically to PIL here, and the user has nothing to change
    r"The image decoding and encoding capabilities of TorchVision are deprecated",
)
# logging records: (logger name, message pattern)
SILENCED_LOG_RECORDS = (
    # an advertisement for Lightning's cloud logger
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging"),
    # timm, when the whole schedule is one step: the lr is then constant, which is what such a run asks for
    ("timm.scheduler.cosine_lr", r"Cosine annealing scheduler will have no effect"),
    # module.compile=true on a machine without CUDA, with a CUDA build of torch: inductor's C++ toolchain looks for
    # the CUDA runtime its CPU kernels do not need
    ("torch.utils.cpp_extension", r"No CUDA runtime is found, using CUDA_HOME="),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


class _OnceExplained(logging.Filter):
    """Drops matching records; the first one is replaced by one ``explanation`` line (on the deit_train logger,
    so that it prints once, not once per handler of the noisy logger)."""

    def __init__(self, pattern: str, explanation: str) -> None:
        super().__init__()
        self.pattern, self.explanation, self.explained = re.compile(pattern), explanation, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.match(record.getMessage()):
            return True
        if not self.explained:
            self.explained = True
            logging.getLogger("deit_train").info(self.explanation)
        return False


# submitit polls `sacct` with growing intervals while a sweep runs; on a cluster without accounting each poll
# fails with a warning (and sacct's own "Slurm accounting storage is disabled"). The jobs are unaffected:
# submitit sees them finish through their result files.
SACCT_EXPLANATION = ("sacct fails on this cluster (no Slurm accounting): submitit follows the jobs through their "
                     "result files instead; sacct's 'accounting storage is disabled' lines are harmless")

# one filter object per logger, so that installing them again changes nothing
_LOG_FILTERS = [(name, _DropMatching(pattern)) for name, pattern in SILENCED_LOG_RECORDS] + [
    ("submitit", _OnceExplained(r"Call #\d+ - Bypassing sacct error", SACCT_EXPLANATION))]


def quiet_console() -> None:
    """Install the filters above; calling it again changes nothing (an equal warnings filter replaces itself,
    a logger keeps one copy of a filter object)."""
    for pattern in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, log_filter in _LOG_FILTERS:
        logging.getLogger(name).addFilter(log_filter)


class ModelSummary(LightningModelSummary):
    """Lightning's model summary, without the FLOPs column and total when nothing was counted.

    Lightning counts FLOPs only for a module with an ``example_input_array``; ours have none (a forward pass
    at fit start would cost a compile under ``torch.compile``), and a column of zeros reads as a measurement.
    """

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:
            LightningModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                            total_training_modes, total_flops, **summarize_kwargs)
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        summary_log.info("\n" + table.rsplit("\n", 1)[0])  # the last line is "0  Total Flops"
