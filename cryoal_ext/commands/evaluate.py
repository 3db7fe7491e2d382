"""Score a picks file against ground truth: AP, AP90, counts at a threshold, precision-recall PNG."""
from __future__ import annotations

import json
import sys

import numpy as np

from ..files import by_micrograph, read_coordinates
from ..io import list_micrographs, micrograph_name, read_mrc
from ..metrics import evaluate
from ..validate import finite_number, non_negative_number, positive_number


def add_arguments(p) -> None:
    p.add_argument("--picks", required=True, help="picks (Topaz txt with score, or RELION STAR with FOM)")
    p.add_argument("--truth", required=True, help="ground truth (Topaz txt or RELION STAR)")
    p.add_argument("--radius-px", type=positive_number, required=True, help="match radius in micrograph pixels")
    p.add_argument("--border-px", type=non_negative_number, default=0.0)
    p.add_argument("--micrographs", default=None, help="folder of the micrographs (needed for --border-px)")
    p.add_argument("--threshold", type=finite_number, default=0.5, help="score threshold for TP/FP counts")
    p.add_argument("--plot", default=None, help="precision-recall curve PNG")
    p.add_argument("--only-picked", action="store_true",
                   help="score only the micrographs that have picks (e.g. a benchmark's held-out picks); by default "
                        "a ground-truth micrograph without picks counts as missed particles")
    p.add_argument("--debug", action="store_true")


def main(args) -> int:
    picks = read_coordinates(args.picks)
    if "score" not in picks.columns:
        raise ValueError(f"{args.picks}: picks need a score column to rank them")
    truth = by_micrograph(read_coordinates(args.truth))
    preds = {n: (g["x"].to_numpy(), g["y"].to_numpy(), g["score"].to_numpy()) for n, g in picks.groupby("image_name")}
    unpicked = [] if args.only_picked else sorted(set(truth) - set(preds))
    if unpicked:  # a micrograph that failed to pick is missed particles, never a better recall
        lost = sum(truth[n][0].size for n in unpicked)
        print(f"cryoal evaluate: warning: {len(unpicked)} micrograph(s) of {args.truth} have no picks in "
              f"{args.picks} (e.g. {', '.join(unpicked[:3])}); their {lost} true particle(s) count as misses "
              "(--only-picked scores only the picked micrographs)",
              file=sys.stderr)
        empty = np.empty(0)
        preds.update({n: (empty, empty, empty) for n in unpicked})
    shapes = None
    if args.border_px > 0:
        if not args.micrographs:
            raise ValueError("--border-px needs --micrographs to know image sizes")
        shapes = {micrograph_name(f): read_mrc(f)[0].shape for f in list_micrographs(args.micrographs)}
    ev = evaluate(preds, truth, args.radius_px, shapes=shapes, border=args.border_px)
    out = ev.to_dict() | {"at_threshold": ev.counts_at(args.threshold)}
    print(json.dumps(out, indent=1))
    if args.plot:
        from ..plots import plot_pr

        plot_pr({"picks": ev}, args.plot)
    return 0
