"""The search space: ``hydra.sweeper.params`` (and sweep overrides on the command line) in Hydra's override grammar,
as the published hydra-optuna-sweeper reads it, turned into Optuna distributions.

``interval(a, b)`` is a float (int when both ends are ints) range, ``tag(log, interval(a, b))`` its log scale,
``range(a, b, step)`` a stepped int/float range, ``choice(x, y, ...)`` a categorical; anything else is a fixed
override passed to every trial.
"""
from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution,
                                  distribution_to_json)

from deit_train.errors import ConfigError

_ABSENT = object()


def _distribution(override: Override) -> BaseDistribution:
    key, value = override.get_key_element(), override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise ConfigError(f"hydra.sweeper.params: {key}={override.get_value_string()} has no choices: list at "
                              "least one")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if step <= 0 or stop <= start:
            raise ConfigError(f"hydra.sweeper.params: {key}=range({start}, {stop}, step={step}) is empty or "
                              "inverted: use range(low, high) with low < high and a positive step")
        if all(isinstance(v, int) for v in (start, stop, step)):  # Hydra's range excludes stop, Optuna's includes high
            return IntDistribution(start, start + (stop - 1 - start) // step * step, step=step)
        count = int((stop - start) / step - 1e-9)  # the last value below stop
        return FloatDistribution(float(start), float(start + count * step), step=float(step))
    if isinstance(value, IntervalSweep):
        start, end, log = value.start, value.end, "log" in value.tags
        if not start < end:
            raise ConfigError(f"hydra.sweeper.params: {key}=interval({start}, {end}) is empty or inverted: use "
                              "interval(low, high) with low < high")
        if log and start <= 0:
            raise ConfigError(f"hydra.sweeper.params: {key}=tag(log, interval({start}, {end})) starts at {start}: "
                              "a log scale needs low > 0")
        if isinstance(start, int) and isinstance(end, int):
            return IntDistribution(start, end, log=log)
        return FloatDistribution(float(start), float(end), log=log)
    raise ConfigError(f"hydra.sweeper.params: {key}={override.get_value_string()} is not a search range: use "
                      "interval(a, b), tag(log, interval(a, b)), range(a, b, step) or choice(x, y, ...)")


def parse_space(params: DictConfig | dict | None, arguments: list[str]) -> tuple[dict[str, BaseDistribution],
                                                                                   list[str]]:
    """(distributions by config path, fixed overrides) of the sweeper's ``params`` and the command line's
    ``arguments``; a command-line override of a searched path replaces its range (the published sweeper's rule)."""
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except OverrideParseException as exc:
        raise ConfigError(f"hydra.sweeper.params: {str(exc).splitlines()[0]}") from exc
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = _distribution(override)
            fixed.pop(key, None)
        else:
            fixed[key] = override.input_line
            space.pop(key, None)
    return space, list(fixed.values())


def check_paths(space: dict[str, BaseDistribution], config: DictConfig) -> None:
    """Every searched path is an option of the composed config or a config group."""
    choices = config.hydra.runtime.choices
    for key in space:
        path = key.lstrip("+~")
        if path in choices or OmegaConf.select(config, path, default=_ABSENT) is not _ABSENT:
            continue
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        hint = (f"options of {parent}: {', '.join(map(str, OmegaConf.select(config, parent).keys()))}"
                if parent and OmegaConf.is_dict(OmegaConf.select(config, parent, default=None)) else
                "check the spelling against `python -m deit_train <overrides> --cfg job`")
        raise ConfigError(f"hydra.sweeper.params: {path} is not an option of this config ({hint})")


def space_identity(space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """The space as stored with the study (JSON), to refuse continuing a study with another space."""
    return {key: distribution_to_json(space[key]) for key in sorted(space)}


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's parameters as command-line overrides (repr keeps floats exact)."""
    return [f"{key}={'null' if value is None else repr(value) if isinstance(value, float) else value}"
            for key, value in params.items()]
