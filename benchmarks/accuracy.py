"""Accuracy experiments for issue 3: recipe variants x datasets x seeds, same protocol as `cryoal benchmark`.

Loads each dataset's features once (cached), then runs every variant on every seed and prints
mean / min AP per budget next to the pretrained baseline.  Results go to benchmarks/results/.

    python benchmarks/accuracy.py --datasets 10028,10017 --seeds 0,1,2,3,4 --variants seed,default --tag main

A variant may name its own features after '@': ``seed@resnet16_u32`` is the published recipe on the
published (one-view) features, side by side with the default on ``--feature-model``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from cryoal_ext.atomic import write_json
from cryoal_ext.benchmark import BenchmarkSettings, load_data, run_one
from cryoal_ext.features import DEFAULT_FEATURE_MODEL
from cryoal_ext.recipes import get_recipe

DATA = Path(os.environ.get("CRYOAL_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATASETS = {
    "10028": dict(micrographs=str(DATA / "empiar10028/micrographs"), truth=str(DATA / "empiar10028/particles.txt"),
                  radius_px=28.0, border_px=0.0),
    "10017": dict(micrographs=str(DATA / "empiar10017/micrographs"), truth=str(DATA / "empiar10017/particles.txt"),
                  radius_px=13.5, border_px=20.0),
}
# name: (base recipe, overrides)
VARIANTS = {
    "seed": ("seed", {}),
    "seed_careful": ("seed", {}),  # same recipe; run with --oracle careful to separate oracle from recipe
    "default": ("default", {}),
}


def parse_variant(text: str):
    """'name' from VARIANTS, or 'base:key=value:key=value' for an ad-hoc variant; '@features' optional."""
    spec, _, fm = text.partition("@")
    if spec in VARIANTS:
        return text, VARIANTS[spec], fm or None
    base, *pairs = spec.split(":")
    over = {}
    for p in pairs:
        k, v = p.split("=", 1)
        try:
            over[k] = json.loads(v)  # numbers, true/false, lists
        except json.JSONDecodeError:
            over[k] = v  # a plain word: 'features', 'pretrained'
    return text, (base, over), fm or None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="10028,10017")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--variants", default="seed,default")
    ap.add_argument("--budgets", default="10,25,50,100")
    ap.add_argument("--oracle", default="careful")
    ap.add_argument("--ceiling", action="store_true")
    ap.add_argument("--feature-model", default=DEFAULT_FEATURE_MODEL)
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--tag", default="run")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    budgets = tuple(int(b) for b in a.budgets.split(","))
    out = {"command": "python benchmarks/accuracy.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v not in (False, None)), "results": {}}
    for ds in a.datasets.split(","):
        loaded = {}
        for vtext in a.variants.split(","):
            name, (base, over), fm = parse_variant(vtext)
            s = BenchmarkSettings(**DATASETS[ds], budgets=budgets, batch=10, oracle=a.oracle, ceiling=a.ceiling,
                                  cache_dir=a.cache_dir, feature_model=fm or a.feature_model)
            if s.feature_model not in loaded:
                loaded[s.feature_model] = load_data(s, progress=lambda *_: None)
            data = loaded[s.feature_model]
            recipe = get_recipe(base, **over)
            t = time.perf_counter()
            runs = [run_one(s, recipe, seed, data, progress=lambda *_: None) for seed in seeds]
            base_ap = np.array([r["baseline"]["ap"] for r in runs])
            aps = np.array([[x["ap"] for x in r["active"]] for r in runs])
            row = " ".join(f"{m:.3f}/{lo:+.3f}" for m, lo in zip(aps.mean(0), (aps - base_ap[:, None]).min(0)))
            ceil = f" ceiling {np.mean([r['ceiling']['ap'] for r in runs]):.3f}" if a.ceiling else ""
            rt = np.median([r["timing"]["round_median_s"] for r in runs])
            print(f"{ds} {name:45s} base {base_ap.mean():.3f} | mean/min-gain @{budgets}: {row}{ceil} "
                  f"| round {rt:.2f}s ({time.perf_counter() - t:.0f}s)", flush=True)
            out["results"].setdefault(ds, {})[name] = {"recipe": recipe.to_dict(), "feature_model": s.feature_model,
                                                      "runs": runs,
                                                      "mean_ap": aps.mean(0).round(4).tolist(),
                                                      "baseline_mean": round(float(base_ap.mean()), 4)}
            write_json(Path(__file__).parent / "results" / f"accuracy_{a.tag}.json", out)


if __name__ == "__main__":
    main()
