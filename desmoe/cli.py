"""Shared launcher arguments: the DeepSpeed JSON, the experiment YAML, overrides.

Paths: a relative path (``--config``, ``--deepspeed``, a path in a config or an override) resolves
against the current directory, as for any command; the launchers' own defaults (``configs/zero2.json``,
an embedded default YAML) are the repository's files wherever the launcher is started from.  The
shipped configs name repository folders (``data/demo``, ``cache/base/...``): started from another
directory, a relative input path that exists only in the repository is refused in one line rather than
silently read from (or built again in) the current directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, TypeVar

from desmoe.config import load_config, split_overrides
from desmoe.errors import ConfigError, UserError
from desmoe.training.preemption import arm_early

C = TypeVar("C")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEEPSPEED = "configs/zero2.json"
# Config keys ending so are written (or rebuilt identically) by the run: created where they resolve.
OUTPUT_SUFFIXES = ("dir", "cache")


def parse_launcher_args(cls: type[C], doc: Optional[str] = None, argv=None,
                        default_config: Optional[str] = None,
                        parents: Sequence[argparse.ArgumentParser] = ()) -> tuple[C, argparse.Namespace]:
    """``default_config``: the experiment YAML used when ``--config`` is not given (the
    launcher's embedded default, relative to the repository); without one the dataclass defaults apply.
    ``parents``: a launcher's own options (``add_help=False`` parsers), listed by ``--help`` too."""
    arm_early()  # the launchers arm it before their imports already; the studies' runs rely on this one
    if default_config is not None and not Path(default_config).is_absolute():
        default_config = str(REPO / default_config)
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents),
        usage="%(prog)s [--deepspeed JSON] [--config YAML] [key.path=value | --key.path value ...]",
        epilog="overrides: dotted keys of the experiment YAML, as key.path=value or --key.path value "
               "(e.g. train.steps=50 or --train.steps 50); relative paths resolve against the current directory")
    parser.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", default=None,
                        help=f"DeepSpeed JSON config (default: the repository's {DEFAULT_DEEPSPEED})")
    parser.add_argument("--config", default=default_config,
                        help=f"experiment YAML (default: {default_config or 'the built-in defaults'})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK is read from the environment")
    # No positional argument: argparse would take the value of `--key.path value` as one, leaving the
    # flag without it.  Every argument it does not know is an override, in the order given.
    args, extra = parser.parse_known_args(argv)
    if args.deepspeed is None:
        args.deepspeed = str(REPO / DEFAULT_DEEPSPEED)
    else:
        _check_here("--deepspeed", args.deepspeed)
    if args.config is not None:
        _check_here("--config", args.config)
    cfg = load_config(cls, args.config, split_overrides(extra))
    check_relative_paths(cfg)
    _say_where()
    return cfg, args


def _elsewhere(cwd: Optional[Path] = None) -> bool:
    return (cwd or Path.cwd()).resolve() != REPO


def _check_here(what: str, value: str, cwd: Optional[Path] = None) -> None:
    """Refuse a relative path missing from the current directory that the repository has."""
    cwd = cwd or Path.cwd()
    path = Path(value)
    if path.is_absolute() or not _elsewhere(cwd) or (cwd / path).exists() or not (REPO / path).exists():
        return
    raise UserError(f"{what}='{value}': not in the current directory {cwd} (relative paths resolve against it), "
                    f"but the repository has it: run from {REPO} or give {REPO / path}")


def _string_leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _string_leaves(child, f"{prefix}{key}.")
    elif isinstance(value, str):
        yield prefix.rstrip("."), value


def check_relative_paths(cfg: Any, cwd: Optional[Path] = None) -> None:
    """An input path of the config (a relative value with a '/', on a key not ending in dir/cache) that
    names nothing under the current directory but exists in the repository: the config was written
    for the repository (every shipped one is), so reading from here would train on other data or build
    it again here.  One line naming the key and both places."""
    if not dataclasses.is_dataclass(cfg):
        return
    for key, value in _string_leaves(dataclasses.asdict(cfg)):
        if re.match(r"~[\w.-]*/", value):
            # bash expands ~ only at the start of a word or after the = of a variable assignment, and
            # `run.dir=~/runs` is neither; YAML does not either: the run went to a folder named '~' here
            raise ConfigError(f"{key}='{value}': nothing expands '~' here (not the shell in key=value, nor YAML), "
                            f"so it would name a folder '~' in {cwd or Path.cwd()}: give the path in full "
                            f"({'$HOME' + value[1:] if value.startswith('~/') else os.path.expanduser(value)}) or as --{key} {value}")
        if "/" in value and "://" not in value and not key.lower().endswith(OUTPUT_SUFFIXES):
            _check_here(key, value, cwd)


def _say_where() -> None:
    """Started outside the repository: say once (rank 0) where relative paths go."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if _elsewhere() and rank == "0":
        print(f"desmoe: relative paths resolve against the current directory {Path.cwd()} "
              f"(the repository is {REPO})", file=sys.stderr, flush=True)
