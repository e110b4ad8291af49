"""``key=value`` command lines for the tools beside training (export, predict, benchmark).

Same override syntax as the Hydra entry point (``images=[a.png,b.png]``, ``precisions=[fp32,bf16]``), without
Hydra's run directories: these tools write only where ``out=`` says.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from deit_train.errors import ConfigError, one_line_errors
from deit_train.run.environment import freeze_imported_objects


def parse_args(defaults: dict, argv: Sequence[str], usage: str) -> DictConfig:
    """``defaults`` overridden by ``key=value`` items; ``--flag`` is ``flag=true``; unknown keys are an error
    (below a dict-valued option, ``option.key=value`` may add keys)."""
    items = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        items.append(f"{arg[2:]}=true" if arg.startswith("--") and "=" not in arg else arg.removeprefix("--"))
    cfg = OmegaConf.create(defaults)
    for item in items:
        key = item.split("=", 1)[0]
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not key=value\n{usage}")
        top = key.split(".", 1)[0]
        if top not in defaults or ("." in key and not isinstance(defaults[top], dict)):
            raise ConfigError(f"unknown option '{key}': options are {', '.join(defaults)}")
        try:
            cfg.merge_with(OmegaConf.from_dotlist([item]))
        except Exception as exc:  # OmegaConf's own type errors name the key and value
            raise ConfigError(f"bad value in '{item}': {exc}".splitlines()[0]) from exc
        default, value = OmegaConf.select(OmegaConf.create(defaults), key), OmegaConf.select(cfg, key)
        if _is_number(default) and not _is_number(value):
            raise ConfigError(f"{key}={value!r} is not a number (default {default}): pass a number")
    return cfg


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_main(main: Callable[[DictConfig], object], defaults: dict, usage: str,
             argv: Sequence[str] | None = None) -> None:
    """Parse, run, and turn user errors into one ``error: ...`` line with exit status 2."""
    freeze_imported_objects()
    with one_line_errors():
        main(parse_args(defaults, sys.argv[1:] if argv is None else argv, usage))
