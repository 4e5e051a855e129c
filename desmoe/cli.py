"""Shared launcher arguments: the DeepSpeed JSON, the experiment YAML, overrides."""
from __future__ import annotations

import argparse
from typing import Optional, TypeVar

from desmoe.config import load_config, split_overrides

C = TypeVar("C")


def parse_launcher_args(cls: type[C], doc: Optional[str] = None, argv=None,
                        default_config: Optional[str] = None) -> tuple[C, argparse.Namespace]:
    """``default_config``: the experiment YAML used when ``--config`` is not given (the
    launcher's embedded default); without one the dataclass defaults apply."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", default="configs/zero2.json",
                        help="DeepSpeed JSON config (default: configs/zero2.json)")
    parser.add_argument("--config", default=default_config,
                        help=f"experiment YAML (default: {default_config or 'the built-in defaults'})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK is read from the environment")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")
    args, extra = parser.parse_known_args(argv)
    cfg = load_config(cls, args.config, split_overrides(list(args.overrides) + extra))
    return cfg, args
