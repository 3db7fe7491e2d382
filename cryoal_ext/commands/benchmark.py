"""Oracle benchmark: AP of the pretrained model and of active learning at several label budgets."""
from __future__ import annotations

import json

from ..benchmark import BenchmarkSettings, run_benchmark
from ..validate import non_negative_number, positive_int, positive_number
from .common import add_engine_arguments, apply_threads, check_inputs, parse_int_list


def add_arguments(p) -> None:
    p.add_argument("--micrographs", required=True, help="folder of .mrc micrographs")
    p.add_argument("--truth", required=True, help="ground-truth centres: Topaz txt or RELION STAR")
    p.add_argument("--radius-px", type=positive_number, required=True, help="particle radius in micrograph pixels")
    p.add_argument("--border-px", type=non_negative_number, default=0.0, help="ignore truth and picks this close to an edge")
    p.add_argument("--train-micrographs", type=positive_int, default=2)
    p.add_argument("--budgets", type=parse_int_list, default=(10, 25, 50, 100))
    p.add_argument("--batch", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=parse_int_list, default=None, help="several seeds, e.g. 0,1,2,3,4")
    p.add_argument("--repeats", type=int, default=None, help="seeds seed..seed+repeats-1")
    p.add_argument("--recipe", default="default", help="recipe name(s), comma-separated: default, seed, head (the default until issue 16: held towards Topaz's head), evidence (head, its prior strength chosen by the answers' evidence); NAME@FEATURES runs that recipe on other "
                        "features, e.g. seed@resnet16_u32 (the published recipe on the published one-view features)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting (repeatable), e.g. --set l2=10")
    p.add_argument("--oracle", default="careful", choices=("careful", "literal"),
                   help="careful: a hit is labelled at the true centre (default); literal: the published answer")
    p.add_argument("--splits", default="seed", choices=("seed", "all"),
                   help="seed: the seed draws the training micrographs (default); all: every choice of "
                        "--train-micrographs of them, each with every seed (mean and worst reported)")
    p.add_argument("--no-calibration", action="store_true",
                   help="count and threshold with the raw BLR probabilities (no Platt scaling on held-out answers)")
    p.add_argument("--audit-micrographs", type=positive_int, default=2,
                   help="for a recipe with audits (audited): micrographs not trained on whose picks it audits, "
                        "left out of the evaluation")
    p.add_argument("--ceiling", action="store_true", help="also train on every true particle of the training micrographs")
    p.add_argument("--json", required=True, help="output JSON; beside it OUT.png (AP vs labels), "
                   "OUT_calibration.png (reliability, expected vs true count), OUT_fig3.png (true/false positives)")
    p.add_argument("--picks-out", default=None, help="write baseline.txt and labels_N.txt here")
    add_engine_arguments(p)


def _overrides(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(args) -> int:
    apply_threads(args)
    from pathlib import Path

    from ..io import list_micrographs

    check_inputs(args, list_micrographs(args.micrographs),
                 {"output folder (--json)": Path(args.json).parent, "--picks-out folder": args.picks_out,
                  "feature cache folder (--cache-dir)": args.cache_dir})
    seeds = args.seeds or (tuple(range(args.seed, args.seed + args.repeats)) if args.repeats else (args.seed,))
    s = BenchmarkSettings(
        micrographs=args.micrographs, truth=args.truth, radius_px=args.radius_px, pixel_size=args.pixel_size,
        border_px=args.border_px, train_micrographs=args.train_micrographs, budgets=tuple(args.budgets),
        batch=args.batch, seeds=tuple(seeds), feature_model=args.feature_model,
        working_pixel_size=args.working_pixel_size, oracle=args.oracle,
        recipes=tuple(r.strip() for r in args.recipe.split(",") if r.strip()),
        recipe_overrides=_overrides(args.set), ceiling=args.ceiling, splits=args.splits,
        calibrate=not args.no_calibration, cache_dir=args.cache_dir, device=args.device,
        audit_micrographs=args.audit_micrographs,
    )
    result = run_benchmark(s, args.json, args.picks_out)
    shown = result["summary"] if "summary" in result else {k: result[k] for k in ("baseline", "active", "timing")}
    print(json.dumps(shown, indent=1))
    return 0
