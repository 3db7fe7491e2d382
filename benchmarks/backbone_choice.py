"""Which backbone's features, chosen by the answers themselves? (issue 16, item 5: a second feature source)

Why: on every split of the shared data `resnet16_u64` features beat `resnet16_u32` on EMPIAR-10017
(default recipe, all 15 splits: +0.025 at 10 labels, +0.016 at 100, 14 of 15 splits at 100) and
lose on EMPIAR-10028 (-0.064 at 10, -0.008 at 100; `results/accuracy_u64_splits.json`), so neither is a
default for both.  A session could choose per dataset if its answers say which features predict
them better.  The test: the default loop on `resnet16_u32` collects the answers (its proposals, as
the product makes them); at each budget the same answers also fit the default recipe on
`resnet16_u64`; each model's answers are scored held out (`strength_cv.held_out_loglik`: folds of
whole rounds, the recipe's own prior strength), and the backbone with the higher held-out
log-likelihood is "chosen".  Reported per budget: AP of u32 (the loop's own model), of u64 on the same
answers, of the chosen one, and how often u64 was chosen; mean and worst split.

    CRYOAL_CACHE=/work/cache OMP_NUM_THREADS=1 python benchmarks/backbone_choice.py --datasets 10028,10017
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from cryoal_ext.atomic import write_json
from cryoal_ext.benchmark import BenchmarkSettings, _evaluate, load_data
from cryoal_ext.learner import ActiveLearner
from cryoal_ext.recipes import get_recipe
from cryoal_ext.strength_cv import held_out_loglik

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import DATASETS, every_split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="10028,10017")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--budgets", default="10,25,50,100")
    ap.add_argument("--first", default="resnet16_u32", help="the features the loop runs on")
    ap.add_argument("--second", default="resnet16_u64", help="the features fitted on the same answers")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--tag", default="u32_u64")
    a = ap.parse_args()
    budgets = tuple(int(b) for b in a.budgets.split(","))
    recipe = get_recipe("default")
    out = {"command": "python benchmarks/backbone_choice.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()), "results": {}}
    for ds in a.datasets.split(","):
        s1 = BenchmarkSettings(**DATASETS[ds], budgets=budgets, cache_dir=a.cache_dir, feature_model=a.first,
                               splits="all")
        s2 = BenchmarkSettings(**DATASETS[ds], budgets=budgets, cache_dir=a.cache_dir, feature_model=a.second,
                               splits="all")
        d1, d2 = load_data(s1, progress=lambda *_: None), load_data(s2, progress=lambda *_: None)
        runs = []

        def second(learner, evals, budget, labels, seed):
            other = ActiveLearner([d2["items"][n] for n in learner.items], s2.radius_px, recipe, a.second, seed=seed)
            other.fit(labels)
            ev = _evaluate([other.picks(d2["items"][n].mic, d2["items"][n].fmap) for n in evals],
                           d2["truth"], s2, d2["shapes"])
            return {"ap_second": round(ev.ap, 4),
                    "ll_first": round(held_out_loglik(learner, labels, 1.0, learner.model), 4),
                    "ll_second": round(held_out_loglik(other, labels, 1.0, other.model), 4)}

        for si, seed, r in every_split(s1, recipe, [int(x) for x in a.seeds.split(",")], d1, extra=second):
            runs.append(r)
            row = " ".join(f"{x['labels']}: {x['ap']:.3f}/{x['extra']['ap_second']:.3f} "
                           f"{'2nd' if x['extra']['ll_second'] > x['extra']['ll_first'] else '1st'}"
                           for x in r["active"])
            print(f"{ds} split {si} seed {seed} | AP first/second, chosen: {row}", flush=True)
        out["results"][ds] = {"runs": runs, "summary": summary(runs)}
        write_json(Path(__file__).parent / "results" / f"backbone_choice_{a.tag}.json", out)
        for b, c in out["results"][ds]["summary"].items():
            print(f"{ds} @{b}: " + " | ".join(f"{k} {v}" for k, v in c.items()), flush=True)


def summary(runs: list[dict]) -> dict:
    """Per budget: mean / worst split AP of the first, the second and the chosen features; how often the second."""
    out = {}
    for i, b in enumerate(x["labels"] for x in runs[0]["active"]):
        first = np.array([r["active"][i]["ap"] for r in runs])
        e = [r["active"][i]["extra"] for r in runs]
        second = np.array([x["ap_second"] for x in e])
        pick = np.array([x["ll_second"] > x["ll_first"] for x in e])
        chosen = np.where(pick, second, first)
        best = np.maximum(first, second)
        out[str(b)] = {name: f"{v.mean():.3f}/{v.min():.3f}" for name, v in
                       (("first", first), ("second", second), ("chosen", chosen), ("best", best))}
        out[str(b)]["second_chosen"] = f"{int(pick.sum())}/{len(pick)}"
        out[str(b)]["right_choice"] = f"{int(np.sum(chosen >= best - 1e-9))}/{len(pick)}"
    return out


if __name__ == "__main__":
    main()
