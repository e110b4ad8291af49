"""Pack a data set into shards: ``python -m deit_train.pack data=imagefolder data.root=/data/imagenet
out=/nvme/imagenet-pack`` (or ``data=hf data.path=...``), then train with ``data=shards data.root=/nvme/imagenet-pack``.

Phases: compose the config (the training config's data group, plus ``out`` and ``pack.*``), list the source,
write the shards (parallel, resumable: run the same command again after an interruption), report. The logic is in
:mod:`deit_train.data.pack`.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig

from deit_train.data.pack import PackSource, write_pack
from deit_train.errors import ConfigError, one_line_errors
from deit_train.run.config import CONFIG_DIR, register_resolvers
from deit_train.run.environment import freeze_imported_objects


def compose_pack_config(overrides: Sequence[str]) -> DictConfig:
    """``configs/pack.yaml`` with ``key=value`` overrides, as the command line gives them."""
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("pack", overrides=list(overrides))
    except HydraException as exc:
        if str(exc).startswith("Could not override"):  # Hydra's hint (+key=value) would add an unused option
            raise ConfigError(f"{str(exc).splitlines()[0]} it is not an option of the pack command (options: "
                              "data=<source> data.*, out=, pack.max_side=, pack.quality=, pack.workers=, "
                              "pack.chunk_bytes=, progress=)") from exc
        raise ConfigError(" ".join(str(exc).split())) from exc


def pack(cfg: DictConfig) -> dict:
    """List ``cfg.data``'s source and write (or finish) the pack at ``cfg.out``; returns its ``pack.json``."""
    if not cfg.get("out"):
        raise ConfigError("out is not set: pass out=/path/to/pack (a new or empty folder; an interrupted pack of the "
                          "same source is resumed)")
    source = PackSource.of(instantiate(cfg.data))
    options = cfg.pack
    return write_pack(source, cfg.out, max_side=int(options.max_side), quality=int(options.quality),
                      workers=options.workers, chunk_bytes=str(options.chunk_bytes), progress=bool(cfg.progress))


def main(argv: Sequence[str] | None = None) -> None:
    freeze_imported_objects()
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.split("\n\nPhases")[0].replace("``", "") + "\nOptions: configs/pack.yaml (out=, pack.*) and the "
              "data group of configs/train.yaml (data=<source>, data.*).")
        sys.exit(0)
    with one_line_errors():
        cfg = compose_pack_config(argv)
        meta = pack(cfg)
    counts = ", ".join(f"{name} {info['count']} ({info['kinds']['resized']} resized, {info['kinds']['unreadable']} "
                       "unreadable)" for name, info in meta["splits"].items())
    print(f"pack {cfg.out}: {len(meta['classes'])} classes; {counts}; digest {meta['digest'][:16]}")
    print(f"train with: data=shards data.root={cfg.out}")


if __name__ == "__main__":
    main()
