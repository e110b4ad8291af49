"""User-facing errors: one actionable line naming the option, never a traceback wall."""
from __future__ import annotations


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
