"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse
import os

from ..features import DEFAULT_FEATURE_MODEL, FEATURE_MODELS


def default_cache() -> str:
    return os.environ.get("CRYOAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cryoal_ext", "features"))


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--feature-model", default=DEFAULT_FEATURE_MODEL, choices=FEATURE_MODELS, metavar="MODEL",
                   help="Topaz pretrained backbone, +viewsN to average its features over N rotated/flipped "
                        f"copies (1 view is N times faster on a CPU; default %(default)s); one of {', '.join(FEATURE_MODELS)}")
    g.add_argument("--working-pixel-size", type=float, default=8.0, help="A/px after Fourier cropping (default 8)")
    g.add_argument("--pixel-size", type=float, default=None, help="override the MRC header pixel size (A)")
    g.add_argument("--cache-dir", default=default_cache(), help="feature cache folder (default %(default)s; env CRYOAL_CACHE)")
    g.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: cuda when present)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def apply_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
