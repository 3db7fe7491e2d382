"""Which backbone's features, chosen by the answers themselves? (issue 16, item 5: a second feature source)

Why: on every split of the shared data `resnet16_u64` features beat `resnet16_u32` on EMPIAR-10017
(default recipe, all 15 splits: +0.025 at 10 labels, +0.016 at 100, 14 of 15 splits at 100) and
lose on EMPIAR-10028 (-0.064 at 10, -0.008 at 100; `results/accuracy_u64_splits.json`), so neither is a
default for both.  A session could choose per dataset if its answers say which features predict
them better.  The test: the default loop on `resnet16_u32` collects the answers (its proposals, as
the product makes them); at each budget the same answers also fit the default recipe on
`resnet16_u64`; each model's answers are scored held out (`strength_cv.answers_loglik` of
`calibration.held_out_scores`: folds of whole rounds, the recipe's own prior strength), and the backbone with the higher held-out
log-likelihood is "chosen".  Reported per budget: AP of u32 (the loop's own model), of u64 on the same
answers, of the chosen one, and how often u64 was chosen; mean and worst split.

Also the two heads together: picks (NMS) on the mean of the two models' logits, the loop's u32 model
and u64 fitted on its answers (`ap_mean`), next to the mean of Topaz's two pretrained heads
(`ap_pretrained_mean`); a second feature source used as an ensemble rather than a choice.

    CRYOAL_CACHE=/work/cache OMP_NUM_THREADS=1 python benchmarks/backbone_choice.py --datasets 10028,10017
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from cryoal_ext.atomic import write_json
from cryoal_ext.benchmark import (BenchmarkSettings, _evaluate, _threshold_summary, load_data, run_one,
                                  threshold_stats, training_splits)
from cryoal_ext.calibration import (CalibrationSettings, answers, audit_answers, audited_platt, held_out_values,
                                   pick_window)
from cryoal_ext.extract import extract_picks
from cryoal_ext.learner import ActiveLearner
from cryoal_ext.recipes import get_recipe
from cryoal_ext.strength_cv import answers_loglik

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import DATASETS  # noqa: E402


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

        def second(learner, evals, budget, labels, seed, audits):
            other = ActiveLearner([d2["items"][n] for n in learner.items], s2.radius_px, recipe, a.second, seed=seed)
            other.fit(labels)
            ev = _evaluate([other.picks(d2["items"][n].mic, d2["items"][n].fmap) for n in evals],
                           d2["truth"], s2, d2["shapes"])
            maps, base = {}, []
            for n in evals:
                i1, i2 = d1["items"][n], d2["items"][n]
                l1, l2 = learner.model.logit_map(i1.fmap.features), other.model.logit_map(i2.fmap.features)
                assert l1.shape == l2.shape, (n, l1.shape, l2.shape)
                maps[n] = 0.5 * (l1 + l2)
                base.append(extract_picks(n, 0.5 * (i1.fmap.score + i2.fmap.score), i1.mic.frame, s1.radius_px))

            def evaluate_mean(a: float = 1.0, b: float = 0.0):
                return _evaluate([extract_picks(n, a * m + b, d1["items"][n].mic.frame, s1.radius_px)
                                  for n, m in maps.items()], d1["truth"], s1, d1["shapes"])

            ev_mean = evaluate_mean()
            ev_base = _evaluate(base, d1["truth"], s1, d1["shapes"])
            thr = {"raw": threshold_stats(ev_mean)}
            held = held_out_pair(learner, other, labels, audits)
            if held is not None:
                z1, z2, zm, real, audited = held
                cal = audited_platt(zm, np.array([l.label for l in real], dtype=np.float64), audited)
                thr["calibrated"] = {**threshold_stats(evaluate_mean(cal.a, cal.b), cal=cal), "a": round(cal.a, 4),
                                     "b": round(cal.b, 4), "audits": int(audited.sum())}
                ll = {"ll_first": round(answers_loglik(z1, real), 4), "ll_second": round(answers_loglik(z2, real), 4)}
            else:
                ll = {"ll_first": 0.0, "ll_second": 0.0}
            return {"ap_second": round(ev.ap, 4), "ap_mean": round(ev_mean.ap, 4), "threshold_mean": thr,
                    "ap_pretrained_mean": round(ev_base.ap, 4), **ll}

        for si, seed, r in every_split_with_audits(s1, recipe, [int(x) for x in a.seeds.split(",")], d1, second):
            runs.append(r)
            row = " ".join(f"{x['labels']}: {x['ap']:.3f}/{x['extra']['ap_second']:.3f}/{x['extra']['ap_mean']:.3f} "
                           f"{'2nd' if x['extra']['ll_second'] > x['extra']['ll_first'] else '1st'}"
                           for x in r["active"])
            print(f"{ds} split {si} seed {seed} | AP first/second/mean of logits, chosen: {row}", flush=True)
        out["results"][ds] = {"runs": runs, "summary": summary(runs)}
        write_json(Path(__file__).parent / "results" / f"backbone_choice_{a.tag}.json", out)
        for b, c in out["results"][ds]["summary"].items():
            print(f"{ds} @{b}: " + " | ".join(f"{k} {v}" for k, v in c.items()), flush=True)


def every_split_with_audits(s: BenchmarkSettings, recipe, seeds, data, extra):
    """``accuracy.every_split``, with the audits asked by each budget passed to ``extra`` too."""
    for si, train in enumerate(training_splits(sorted(data["items"]), s)):
        for seed in seeds:
            labels_at: dict = {}
            audits_at: dict = {}

            def hook(learner, evals, budget, seed=seed):
                return extra(learner, evals, budget, labels_at[budget], seed, audits_at[budget])

            r = run_one(s, recipe, seed, data, progress=lambda *_: None, train=train, extra=hook,
                        labels_at=labels_at, audits_at=audits_at)
            r["split"] = si
            yield si, seed, r


def held_out_pair(learner, other, labels, audits, s: CalibrationSettings = CalibrationSettings()):
    """The package's held-out scoring (``calibration.training_audit_map``) for two models on the same answers.

    Each fold's answers are scored by both models refitted without them, an audit's answer at the
    audited pick (``pick_window``): per model its highest logit there, and for the mean of the two
    logits the highest mean.  ``None`` below the calibration's gate.
    """
    real = answers(learner, labels)
    if len(real) < s.min_answers:
        return None
    pick = {id(l): pick_window(learner, p) for l, p in audit_answers(learner, labels, audits)}
    at = [pick.get(id(l), [(l.micrograph, l.x, l.y)]) for l in real]
    v1, _ = held_out_values(learner, real, s.folds, learner.model, s.refit_tol, at=at)
    v2, _ = held_out_values(other, real, s.folds, other.model, s.refit_tol, at=at)
    z1, z2 = np.array([v.max() for v in v1]), np.array([v.max() for v in v2])
    zm = np.array([(0.5 * (a + b)).max() for a, b in zip(v1, v2)])
    return z1, z2, zm, real, np.array([id(l) in pick for l in real])


def summary(runs: list[dict]) -> dict:
    """Per budget: mean / worst split AP of the first, the second and the chosen features; how often the second."""
    out = {}
    for i, b in enumerate(x["labels"] for x in runs[0]["active"]):
        first = np.array([r["active"][i]["ap"] for r in runs])
        e = [r["active"][i]["extra"] for r in runs]
        second = np.array([x["ap_second"] for x in e])
        pick = np.array([x["ll_second"] > x["ll_first"] for x in e])
        out[str(b)] = {}
        chosen = np.where(pick, second, first)
        best = np.maximum(first, second)
        cells = [("first", first), ("second", second), ("chosen", chosen), ("best", best)]
        if "ap_mean" in e[0]:
            mean = np.array([x["ap_mean"] for x in e])
            base = np.array([r["baseline"]["ap"] for r in runs])
            cells += [("mean_of_logits", mean), ("pretrained_mean_of_logits", np.array([x["ap_pretrained_mean"] for x in e]))]
            out[str(b)]["mean_minus_first"] = f"{(mean - first).mean():+.3f} ({(mean - first).min():+.3f}..{(mean - first).max():+.3f})"
            out[str(b)]["mean_worst_gain_over_first_pretrained"] = f"{(mean - base).min():+.3f}"
            for kind in ("raw", "calibrated"):  # sum of p / true count and F1 lost at the suggested threshold
                got = [(r["active"][i]["threshold"][kind], x["threshold_mean"][kind]) for r, x in zip(runs, e)
                       if kind in x.get("threshold_mean", {}) and kind in r["active"][i]["threshold"]]
                if got:
                    out[str(b)][f"threshold_{kind}_first"] = _threshold_summary([g[0] for g in got])
                    out[str(b)][f"threshold_{kind}_mean_of_logits"] = _threshold_summary([g[1] for g in got])
        out[str(b)].update({name: f"{v.mean():.3f}/{v.min():.3f}" for name, v in cells})
        out[str(b)]["second_chosen"] = f"{int(pick.sum())}/{len(pick)}"
        out[str(b)]["right_choice"] = f"{int(np.sum(chosen >= best - 1e-9))}/{len(pick)}"
    return out


if __name__ == "__main__":
    main()
