"""Issue 16, item 5: a linear head that sees context, against the plain linear head, every split.

The BLR sees, at each pixel, Topaz's features there *and* their mean over a square around it
(side 2*s*R+1 working pixels for each scale s, R the particle radius): a particle's own disc
(s = 1) and its neighbourhood (s = 3), so a pick can be told apart by what surrounds it
(carbon edge, ice, aggregate) and not only by its centre pixel.  The prior keeps Topaz's head on
the centre features and 0 on the context ones (so with no labels it *is* the baseline), and the
recipe, proposals, oracle and scoring are the `cryoal benchmark` protocol unchanged.  This is an
experiment outside the package: the features are built here, in memory, and the head's prior is
padded with zeros by patching the learner's `head_of`.

    python benchmarks/context_head.py --dataset 10028 --seeds 0,1 --variants linear,ctx1,ctx3,ctx1+3 --tag views8

`--rescale` gives each pooled channel the spread of its centre channel (the l2 prior otherwise
pulls the smoother, smaller pooled channels harder).  Results: benchmarks/results/context_head_<dataset>_<tag>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402  (the datasets and their radii)

from cryoal_ext import learner as LRN  # noqa: E402
from cryoal_ext.atomic import write_json  # noqa: E402
from cryoal_ext.benchmark import BenchmarkSettings, load_data, run_one, summarise, training_splits  # noqa: E402
from cryoal_ext.features import FeatureMap, head_of  # noqa: E402
from cryoal_ext.learner import Item  # noqa: E402
from cryoal_ext.recipes import get_recipe  # noqa: E402


def scales_of(variant: str) -> list[float]:
    """'linear' -> []; 'ctx1+3' -> [1, 3]."""
    return [] if variant == "linear" else [float(s) for s in variant[3:].split("+")]


def with_context(fmap: FeatureMap, radius_w: float, scales: list[float], rescale: bool) -> FeatureMap:
    f = np.asarray(fmap.features, dtype=np.float32)
    parts = [f]
    for s in scales:
        k = 2 * int(round(s * radius_w)) + 1
        p = uniform_filter(f, size=(1, k, k), mode="reflect")
        if rescale:
            p *= f.std(axis=(1, 2), keepdims=True) / (p.std(axis=(1, 2), keepdims=True) + 1e-6)
        parts.append(p)
    return FeatureMap(np.concatenate(parts).astype(np.float16), fmap.score)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="10028")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="linear,ctx1,ctx3,ctx1+3")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--budgets", default="10,25,50,100")
    ap.add_argument("--feature-model", default="resnet16_u32+views8")
    ap.add_argument("--rescale", action="store_true")
    ap.add_argument("--splits", default="all", choices=("seed", "all"))
    ap.add_argument("--max-splits", type=int, default=0, help="only the first N splits (a quick look)")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--tag", default="run")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    budgets = tuple(int(b) for b in a.budgets.split(","))
    s = BenchmarkSettings(**A.DATASETS[a.dataset], budgets=budgets, batch=10, oracle="careful", ceiling=True,
                          cache_dir=a.cache_dir, feature_model=a.feature_model, splits=a.splits, calibrate=False)
    base = load_data(s, progress=lambda *_: None)
    out = {"command": "python benchmarks/context_head.py " + " ".join(sys.argv[1:]), "results": {}}
    w_center, b_center = head_of(a.feature_model)
    recipe = get_recipe(a.recipe)
    for variant in a.variants.split(","):
        scales = scales_of(variant)
        t = time.perf_counter()
        items = {n: Item(it.mic, with_context(it.fmap, it.mic.frame.radius_to_working(s.radius_px), scales, a.rescale))
                 if scales else it for n, it in base["items"].items()}
        data = dict(base, items=items)
        pad = len(scales) * w_center.size
        LRN.head_of = lambda name, pad=pad: (np.r_[w_center, np.zeros(pad)], b_center)
        t_feat = time.perf_counter() - t
        runs = []
        splits = list(training_splits(sorted(items), s))
        if a.max_splits:
            splits = splits[:a.max_splits]
        for si, train in enumerate(splits):
            for seed in seeds:
                r = run_one(s, recipe, seed, data, progress=lambda *_: None, train=train)
                r["recipe"], r["split"] = variant, si
                runs.append(r)
        summ = summarise(runs)[variant]
        cells = summ["budgets"]
        row = " ".join(f"{c['ap_mean']:.3f}/{c['worst_split_ap_mean']:.3f}/{c['min_gain_over_baseline']:+.3f}"
                       for c in cells.values())
        rt = np.median([r["timing"]["round_median_s"] for r in runs])
        print(f"{a.dataset} {variant:8s} dim {items[next(iter(items))].fmap.features.shape[0]} "
              f"{summ['splits']} splits x {len(seeds)} seeds, base {summ['baseline_ap_mean']:.3f} | "
              f"mean/worst split/min gain @{budgets}: {row} | ceiling {summ['ceiling_ap_mean']:.3f} | "
              f"round {rt:.2f}s, context {t_feat:.0f}s, all {time.perf_counter() - t:.0f}s", flush=True)
        out["results"][variant] = {"scales_R": scales, "rescale": a.rescale, "runs": runs, "summary": summ}
        write_json(Path(__file__).parent / "results" / f"context_head_{a.dataset}_{a.tag}.json", out)
        del items, data


if __name__ == "__main__":
    main()
