"""Compute and cache Topaz features (float16, memory-mapped) for a set of micrographs."""
from __future__ import annotations

import time

from ..features import FeatureCache
from ..io import list_micrographs, load_micrograph
from .common import add_engine_arguments, apply_threads, check_inputs


def add_arguments(p) -> None:
    p.add_argument("micrographs", nargs="+", help="MRC files or folders")
    add_engine_arguments(p)


def expand(paths) -> list:
    from pathlib import Path

    out = []
    for p in paths:
        out += list_micrographs(p) if Path(p).is_dir() else [Path(p)]
    return out


def main(args) -> int:
    apply_threads(args)
    from tqdm import tqdm

    files = expand(args.micrographs)
    check_inputs(args, files, {"feature cache folder (--cache-dir)": args.cache_dir})
    cache = FeatureCache(args.cache_dir, args.feature_model, args.device)
    t = time.perf_counter()
    for f in tqdm(files, unit="mic", desc="features"):
        cache.get(load_micrograph(f, args.working_pixel_size, args.pixel_size))
    print(f"{len(files)} micrographs in {time.perf_counter() - t:.1f} s ({cache.hits} cached, {cache.misses} computed) "
          f"-> {args.cache_dir}")
    return 0
