"""Pick micrographs with a trained model (or Topaz's pretrained head) and write coordinate files."""
from __future__ import annotations

import time
from pathlib import Path

from ..files import write_picks_star, write_topaz
from ..model import BLR
from ..workflow import EngineSettings, MicrographSpec, featurise, predict, suggest_threshold
from .common import add_engine_arguments, apply_threads
from .features import expand


def add_arguments(p) -> None:
    p.add_argument("micrographs", nargs="+", help="MRC files or folders")
    p.add_argument("--model", default=None, help="model.npz from a round or the benchmark (default: pretrained head)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--radius-px", type=float, help="particle radius in micrograph pixels")
    size.add_argument("--diameter-A", type=float, help="particle diameter in Angstrom")
    p.add_argument("--threshold", type=float, default=None, help="keep picks with probability >= this")
    p.add_argument("--out-dir", required=True, help="writes picks.txt and one <name>_picks.star per micrograph")
    p.add_argument("--format", default="txt,star", help="comma-separated: txt, star")
    add_engine_arguments(p)


def main(args) -> int:
    apply_threads(args)
    model = BLR.load(args.model) if args.model else None
    feature_model = model.meta.get("feature_model", args.feature_model) if model else args.feature_model
    s = EngineSettings(radius_px=args.radius_px, diameter_A=args.diameter_A, feature_model=feature_model,
                       working_pixel_size=args.working_pixel_size, cache_dir=args.cache_dir, device=args.device)
    specs = [MicrographSpec(str(f), f.stem, args.pixel_size) for f in expand(args.micrographs)]
    out = Path(args.out_dir)
    formats = {f.strip() for f in args.format.split(",")}
    t = time.perf_counter()
    all_picks = []
    for it, picks in predict(featurise(specs, s), model, lambda it: s.radius_for(it.mic.frame.pixel_size),
                             args.threshold):
        all_picks.append(picks)
        if "star" in formats:
            write_picks_star(out / f"{picks.name}_picks.star", picks)
    if "txt" in formats:
        write_topaz(out / "picks.txt", all_picks)
    import numpy as np

    scores = np.concatenate([p.score for p in all_picks]) if all_picks else np.empty(0)
    thr = suggest_threshold(scores)
    n = int((scores >= thr).sum())
    print(f"{len(all_picks)} micrographs, {scores.size} picks in {time.perf_counter() - t:.1f} s; "
          f"suggested threshold {thr:.3f} keeps {n} picks -> {out}")
    return 0
