"""Would audits of the *training* micrographs' picks calibrate the rest? (issue 16, item 3; offline, not in the package)

Why: recipe ``audited`` asks about the picks of micrographs it never trains on, because on `head`
(one view) the training micrographs' picks under-counted where the rest over-counted.  With the
default since issue 16 (prior towards zero, 8 views) that gap is gone, and audits on the
training micrographs would need no extra micrograph and could run in every front end.

Step 1 (``--dump``): the benchmark's own loop (default recipe, seed 0) to 100 labels on the given
splits; at 100 labels, every pick's raw logit and whether it matches an expert pick, on the
evaluated and on the training micrographs, and the package's calibration map (held-out answers).
Step 2 (always): draw ``m`` audits from the training micrographs' picks in proportion to their
calibrated probability, answer them from the expert picks, fit Platt on them with its prior
centred on the answers' map (sd 1, the package's ``platt``), and score the evaluated picks:
sum of p over the expert count, and the F1 the suggested threshold loses to the best threshold.
The audits are not trained on here; a product version would train on them and score each with a
model fitted without its round (calibration.held_out_scores).

    CRYOAL_CACHE=/work/cache python benchmarks/training_audits.py --dump --dataset 10028 --splits 0,1,2,3,4,5 --tag 10028
    python benchmarks/training_audits.py --tag 10028      # the table again, from the dump
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import accuracy
import weak_features
from audit_probe import raw_picks
from cryoal_ext.benchmark import BenchmarkSettings, _evaluate, load_data, run_one, training_splits
from cryoal_ext.calibration import CalibrationSettings, of, platt
from cryoal_ext.extract import Picks, sigmoid
from cryoal_ext.features import DEFAULT_FEATURE_MODEL
from cryoal_ext.recipes import get_recipe
from cryoal_ext.workflow import suggest_threshold

RESULTS = Path(__file__).parent / "results"


def dump(spec: str, splits: list[int], path: Path, cache_dir: str) -> None:
    s = BenchmarkSettings(**accuracy.dataset(spec), budgets=(100,), batch=10, cache_dir=cache_dir,
                          feature_model=DEFAULT_FEATURE_MODEL, splits="all")
    data = load_data(s, progress=lambda *_: None)
    if "+" in spec:
        data = weak_features.add_noise(data, s.feature_model, float(spec.partition("+")[2]))
    out: dict = {}

    def logits_and_hits(learner, names):
        picks = []
        for n in names:
            p, z = raw_picks(learner, data["items"][n], s.radius_px)
            picks.append(Picks(p.name, p.x, p.y, z))  # scored by logit: the matching needs only the ranking
        ev = _evaluate(picks, data["truth"], s, data["shapes"])
        return ev.scores.astype(np.float32), ev.tp.astype(bool), ev.n_true

    for si, train in enumerate(training_splits(sorted(data["items"]), s)):
        if si not in splits:
            continue

        def hook(learner, evals, budget, si=si):
            for key, names in (("e", evals), ("t", list(learner.items))):
                out[f"s{si}_z{key}"], out[f"s{si}_y{key}"], out[f"s{si}_n{key}"] = logits_and_hits(learner, names)
            cal = of(learner.model)
            out[f"s{si}_ab"] = np.array([cal.a, cal.b])

        run_one(s, get_recipe("default"), 0, data, progress=lambda *_: None, train=train, extra=hook)
        np.savez(path, **out)
        print(f"{spec} split {si} dumped", flush=True)


def f1_lost(p: np.ndarray, hit: np.ndarray, n_true: int) -> float:
    order = np.argsort(-p)
    best = float(np.max(2 * np.cumsum(hit[order]) / (np.arange(1, p.size + 1) + n_true)))
    keep = p >= suggest_threshold(p)
    return best - 2 * hit[keep].sum() / (keep.sum() + n_true)


def table(path: Path, audits: list[int], draws: int) -> None:
    d = np.load(path)
    splits = sorted({k.split("_")[0] for k in d.files})
    for m in [0] + audits:
        ratio, lost = [], []
        for s in splits:
            ze, ye, ne = d[f"{s}_ze"], d[f"{s}_ye"], int(d[f"{s}_ne"])
            zt, yt = d[f"{s}_zt"], d[f"{s}_yt"]
            a, b = d[f"{s}_ab"]
            for draw in range(draws if m else 1):
                if m:
                    w = sigmoid(a * zt + b)
                    i = np.random.default_rng(draw).choice(zt.size, m, replace=False, p=w / w.sum())
                    cal = platt(zt[i], yt[i].astype(float), CalibrationSettings(), centre=(a, b), min_n=1)
                    p = sigmoid(cal.a * ze + cal.b)
                else:
                    p = sigmoid(a * ze + b)
                ratio.append(p.sum() / ne)
                lost.append(f1_lost(p, ye, ne))
        r, g = np.array(ratio), np.array(lost)
        print(f"| {path.stem} | {len(splits)} | {m} | {r.mean():.3f} ({r.max():.3f}; {np.mean(np.abs(r - 1) <= 0.15):.0%}) | "
              f"{g.mean():.3f} ({g.max():.3f}; {np.mean(g <= 0.02):.0%}) |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", action="store_true")
    ap.add_argument("--dataset", default="10028")
    ap.add_argument("--splits", default="0,1,2,3,4,5")
    ap.add_argument("--audits", default="10,30,50")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--tag", required=True)
    a = ap.parse_args()
    path = RESULTS / f"training_audits_{a.tag}.npz"
    if a.dump:
        dump(a.dataset, [int(x) for x in a.splits.split(",")], path, a.cache_dir)
    print("| dump | splits | audits | sum of p / expert count: mean (worst; runs within 15%) | F1 lost: mean (worst; within 0.02) |")
    print("|---|---|---|---|---|")
    table(path, [int(x) for x in a.audits.split(",")], a.draws)


if __name__ == "__main__":
    main()
