"""User-facing errors: one actionable line naming the option, never a traceback wall."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class ConfigError(ValueError):
    """A bad option or input the user can fix; the entry point prints it as a single line."""


def find_config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc`` (Hydra's instantiate wraps what the target raised)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """For entry points: a ConfigError becomes ``error: ...`` on stderr and exit status 2; anything else keeps its
    traceback."""
    try:
        yield
    except Exception as exc:
        error = find_config_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


class StoppedBatch:
    """Stands in for a training batch this rank could not make (a corrupt file met by a loader worker or by the device
    decode): it carries the one line to the rank-wide decision (:mod:`deit_train.stops`) before the step, so that
    every rank stops on it, instead of the error ending this rank alone while the others wait in a collective."""

    def __init__(self, error: ConfigError) -> None:
        self.error = error


def batches_until_stopped(batches: Iterator):
    """``batches`` as they come; the first :class:`ConfigError` met making one ends them with a :class:`StoppedBatch`
    that carries it."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except ConfigError as error:
            yield StoppedBatch(error)
            return
        yield batch
