"""Accuracy experiments: recipe variants x datasets x training splits x seeds, the protocol of `cryoal benchmark`.

Loads each dataset's features once (cached), then runs every variant on every choice of 2
training micrographs (``--splits all``, the default here: 10028 all 6 pairs of 4, 10017 all 15
pairs of 6) and every seed, and prints per budget: mean AP, the worst run, the worst split (its
mean over seeds) and the worst gain over the pretrained baseline; then, at the largest budget,
the expected/true count and the F1 the suggested threshold loses, raw and calibrated.  A default
changes only if it wins on both datasets, mean and worst (issue 16).  Results go to
benchmarks/results/accuracy_<tag>.json.

    python benchmarks/accuracy.py --datasets 10028,10017 --seeds 0,1 --variants default --tag splits

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
from cryoal_ext.benchmark import BenchmarkSettings, load_data, run_one, summarise, training_splits
from cryoal_ext.features import DEFAULT_FEATURE_MODEL
from cryoal_ext.io import list_micrographs
from cryoal_ext.recipes import get_recipe
from cryoal_ext.validate import read_header

import weak_features
import weak_head

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
    "head": ("head", {}),  # the default until issue 16's cross-validation: the prior towards Topaz's head
    "evidence": ("evidence", {}),  # head, its prior strength (l2 and pseudo weight) chosen by the evidence
}


def dataset(spec: str) -> dict:
    """A dataset's settings; '10017/2' is the same files with the pixel size taken as half the header's.

    '10028~0.45': the same dataset with Topaz's head turned until its AP is 0.45 (weak_head.py; the
    turn happens after the features load, in ``main``).  '10028+5': noise of 5x each feature channel's
    spread added to the features (weak_features.py), so the features are weak too; '+5~0.45' both.

    Why: a stand-in for a protein Topaz's head has not met (issue 16's new proteins are not shared). Told
    the pixels are finer than they are, the engine crops the micrograph twice as far, so each particle
    covers half the working pixels: the same real particles and expert picks at a size the pretrained
    head finds less often.  '*f' makes them look larger (at most up to no cropping at all).
    """
    spec = spec.partition("~")[0].partition("+")[0]
    for op in "/*":
        name, sep, f = spec.partition(op)
        if sep:
            d = dict(DATASETS[name])
            header = read_header(list_micrographs(d["micrographs"])[0]).pixel_size
            d["pixel_size"] = header / float(f) if op == "/" else header * float(f)
            return d
    return dict(DATASETS[spec])


def every_split(s: BenchmarkSettings, recipe, seeds, data, extra=None):
    """`run_one` on every training split x seed, yielding (split, seed, record); the record carries its split.

    ``extra(learner, evals, budget, labels, seed)``: called at each budget with the answers collected
    by then (for probes that refit or rescore on the loop's own answers).
    """
    for si, train in enumerate(training_splits(sorted(data["items"]), s)):
        for seed in seeds:
            labels_at: dict = {}
            hook = None if extra is None else (
                lambda learner, evals, budget: extra(learner, evals, budget, labels_at[budget], seed))
            r = run_one(s, recipe, seed, data, progress=lambda *_: None, train=train, extra=hook, labels_at=labels_at)
            r["split"] = si
            yield si, seed, r


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
    ap.add_argument("--splits", default="all", choices=("seed", "all"))
    ap.add_argument("--no-calibration", action="store_true")
    ap.add_argument("--audit-micrographs", type=int, default=2,
                    help="micrographs (not trained on) kept for a recipe's audits, out of the evaluation")
    ap.add_argument("--feature-model", default=DEFAULT_FEATURE_MODEL)
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--tag", default="run")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    budgets = tuple(int(b) for b in a.budgets.split(","))
    out = {"command": "python benchmarks/accuracy.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v not in (False, None)), "results": {}}
    for ds in a.datasets.split(","):
        loaded, settings = {}, dataset(ds)
        for vtext in a.variants.split(","):
            name, (base, over), fm = parse_variant(vtext)
            s = BenchmarkSettings(**settings, budgets=budgets, batch=10, oracle=a.oracle, ceiling=a.ceiling,
                                  cache_dir=a.cache_dir, feature_model=fm or a.feature_model, splits=a.splits,
                                  calibrate=not a.no_calibration, audit_micrographs=a.audit_micrographs)
            recipe = get_recipe(base, **over)
            if s.feature_model not in loaded:
                loaded[s.feature_model] = load_data(s, progress=lambda *_: None)
                if "+" in ds:  # weak features: smooth noise added to every channel (weak_features.py)
                    sigma = float(ds.partition("+")[2].partition("~")[0])
                    loaded[s.feature_model] = weak_features.add_noise(loaded[s.feature_model], s.feature_model, sigma)
                    print(f"{ds}: features {loaded[s.feature_model]['weak_features']}", flush=True)
                if "~" in ds:  # a weak head: the same features, Topaz's head turned away (weak_head.py)
                    loaded[s.feature_model] = weak_head.weaken(loaded[s.feature_model], s, s.feature_model,
                                                               float(ds.partition("~")[2]))
                    print(f"{ds}: head turned {loaded[s.feature_model]['weak_head']}", flush=True)
            data = loaded[s.feature_model]
            weak_head.use(data)  # the learner's prior centre: the turned head of a '~' dataset, else Topaz's
            t = time.perf_counter()
            runs = []
            for si, train in enumerate(training_splits(sorted(data["items"]), s)):
                for seed in seeds:
                    r = run_one(s, recipe, seed, data, progress=lambda *_: None, train=train)
                    r["recipe"], r["split"] = name, si if train is not None else None
                    runs.append(r)
            summ = summarise(runs)[name]
            cells = summ["budgets"]
            row = " ".join(f"{c['ap_mean']:.3f}/{c['ap_min']:.3f}/{c['worst_split_ap_mean']:.3f}/"
                           f"{c['min_gain_over_baseline']:+.3f}" for c in cells.values())
            ceil = f" ceiling {summ['ceiling_ap_mean']:.3f}" if a.ceiling else ""
            times = [r["timing"]["round_median_s"] for r in runs if r["timing"]["round_median_s"] is not None]
            rt = np.median(times) if times else float("nan")  # one budget of one batch: no refit round
            print(f"{ds} {name:30s} {summ['splits']} splits x {len(seeds)} seeds, base {summ['baseline_ap_mean']:.3f} | "
                  f"mean/worst run/worst split/min gain @{budgets}: {row}{ceil} | round {rt:.2f}s "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
            last = list(cells.values())[-1]
            for kind in ("raw", "calibrated"):
                if kind in last:
                    c = last[kind]
                    print(f"    {kind:10s} @{budgets[-1]}: expected/true mean {c['expected_over_true_mean']:.3f} "
                          f"worst {c['expected_over_true_worst']:.3f} | F1 suggested {c['f1_suggested_mean']:.3f} "
                          f"best {c['f1_best_mean']:.3f} gap mean {c['f1_gap_mean']:.3f} worst {c['f1_gap_worst']:.3f}",
                          flush=True)
            weak = {k: data[k] for k in ("weak_head", "weak_features") if k in data}
            out["results"].setdefault(ds, {})[name] = {"recipe": recipe.to_dict(), "feature_model": s.feature_model, **weak,
                                                      "runs": runs, "summary": summ,
                                                      "mean_ap": [c["ap_mean"] for c in cells.values()],
                                                      "baseline_mean": summ["baseline_ap_mean"]}
            write_json(Path(__file__).parent / "results" / f"accuracy_{a.tag}.json", out)


if __name__ == "__main__":
    main()
