"""Can a few answers about the picks themselves make the probabilities honest? (issue 16, item 3)

Why: calibrating on the user's answers (cryoal_ext/calibration.py) narrows the over-count but does
not close it (expected/true 1.39 on EMPIAR-10028, 1.43 on -10017 at 100 labels, all splits).  The
answers are entropy peaks: spots where the logit is near 0, not local maxima of it.  The count
and the threshold are about the *picks* (NMS maxima, mostly confident), a population the answers
never sample; an affine map fitted near the boundary only extrapolates there.

The probe: after the benchmark's own run reaches a budget, draw ``m`` "audit" picks from the
current picks of the training micrographs (never within a particle radius of a spot already
labelled, outside the benchmark's border), with probability proportional to their probability,
so each audit stands for an equal share of the expected count; the oracle answers them.  The
model never trained on them, so their logits are held out.  Sampling that depends on the logit
alone does not bias a fit of P(particle | logit) (selection on the covariate is ignorable), so a
Platt map can be fitted on them as they are.  Maps compared, each applied to the evaluation
micrographs' picks (same ranking, so the same AP):

- ``raw``: the BLR's own probabilities; ``cv``: the package's calibration (held-out answers);
- ``audit``: Platt on the audits alone (prior: identity, sd 1);
- ``audit+cv``: Platt on the audits with its prior centred on the ``cv`` map;
- ``pooled``: Platt on the held-out answers and the audits together.

Reported per map and audit count: expected/true count (mean, worst) and the F1 the suggested
threshold loses to the best threshold (mean, worst), over every split, seeds and ``--draws``
independent audit draws.  The audits are extra labels here (the budget's answers are untouched);
if they work, a product version spends them from the budget and trains on them too.

    CRYOAL_CACHE=/work/cache python benchmarks/audit_probe.py --datasets 10028 --seeds 0 --tag 10028

What it found (README "Audits"): audits of the training micrographs' picks do not calibrate the
rest (the model is better where it learnt); the dump's evaluation picks, taken one micrograph
at a time, showed that audits of a micrograph never trained on do (benchmarks/audit_fits.py
--other-micrographs), which is what the package's recipe ``audited`` asks.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from cryoal_ext.acquisition import Proposal
from cryoal_ext.atomic import write_json
from cryoal_ext.benchmark import BenchmarkSettings, _evaluate, f1_best, load_data, run_one, training_splits
from cryoal_ext.calibration import Calibration, CalibrationSettings, held_out_logits, platt
from cryoal_ext.coords import inside_border
from cryoal_ext.extract import Picks, extract_picks
from cryoal_ext.oracle import Oracle
from cryoal_ext.recipes import get_recipe
from cryoal_ext.workflow import suggest_threshold

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CRYOAL_TEST_DATA", ROOT.parent / "shared" / "data"))
DATASETS = {
    "10028": dict(micrographs=str(DATA / "empiar10028/micrographs"), truth=str(DATA / "empiar10028/particles.txt"),
                  radius_px=28.0, border_px=0.0),
    "10017": dict(micrographs=str(DATA / "empiar10017/micrographs"), truth=str(DATA / "empiar10017/particles.txt"),
                  radius_px=13.5, border_px=20.0),
}
MAPS = ("raw", "cv", "audit", "audit+cv", "pooled")


def platt_centred(z, y, centre=(1.0, 0.0)) -> Calibration:
    """The package's Platt fit around ``centre``, on any number of values (the probe has no gate)."""
    return platt(z, y, CalibrationSettings(), centre=centre, min_n=1)


def raw_picks(learner, it, radius_px: float) -> tuple[Picks, np.ndarray]:
    """Picks of one item (micrograph + features) under the learner's raw (uncalibrated) logit, and their logits."""
    zmap = learner.model.logit_map(it.fmap.features)
    p = extract_picks(it.mic.name, zmap, it.mic.frame, radius_px)
    ix, iy = it.mic.frame.to_working_index(p.x, p.y)
    return p, zmap[iy, ix].astype(np.float64)


def audit_pool(learner, labels, s: BenchmarkSettings, shapes) -> list[tuple[str, float, float, float]]:
    """(micrograph, x, y, raw logit) of every pick of the training micrographs an audit may ask about."""
    pool = []
    for name in learner.items:
        p, z = raw_picks(learner, learner.items[name], s.radius_px)
        keep = np.ones(len(p), bool)
        if s.border_px > 0:
            keep &= inside_border(p.x, p.y, shapes[name], s.border_px)
        lab = np.array([(l.x, l.y) for l in labels if l.micrograph == name]).reshape(-1, 2)
        if lab.size:
            d = np.hypot(p.x[:, None] - lab[None, :, 0], p.y[:, None] - lab[None, :, 1]).min(1)
            keep &= d > s.radius_px
        pool += [(name, float(x), float(y), float(v)) for x, y, v in zip(p.x[keep], p.y[keep], z[keep])]
    return pool


def scored(cal: Calibration, z_eval: list[np.ndarray], picks: list[Picks], truth, s, shapes) -> dict:
    mapped = [Picks(p.name, p.x, p.y, cal.prob(z)) for p, z in zip(picks, z_eval)]
    ev = _evaluate(mapped, truth, s, shapes)
    t = suggest_threshold(ev.scores)
    c = ev.counts_at(t)
    f1 = 2 * c["tp"] / max(2 * c["tp"] + c["fp"] + c["fn"], 1)
    best, _ = f1_best(ev)
    return {"ratio": float(ev.scores.sum() / max(ev.n_true, 1)), "gap": float(best - f1), "f1": float(f1),
            "a": cal.a, "b": cal.b}


def probe(s: BenchmarkSettings, data, m_list, draws: int, seed: int, budgets, labels_at: dict,
          dump: dict | None = None):
    oracle = Oracle(data["truth"], s.radius_px, "careful")

    def extra(learner, evals, budget):
        if budget not in budgets or learner.model is None:
            return None
        labels = labels_at[budget]  # run_one fills it before calling extra
        got = [raw_picks(learner, data["items"][n], s.radius_px) for n in evals]
        picks, z_eval = [g[0] for g in got], [g[1] for g in got]
        zc, yc, _ = held_out_logits(learner, labels, CalibrationSettings())
        cv = platt_centred(zc, yc) if zc.size >= CalibrationSettings().min_answers else Calibration()
        out = {"raw": scored(Calibration(), z_eval, picks, data["truth"], s, data["shapes"]),
               "cv": scored(cv, z_eval, picks, data["truth"], s, data["shapes"]), "audits": {}}
        pool = audit_pool(learner, labels, s, data["shapes"])
        zp = np.array([q[3] for q in pool])
        if dump is not None:  # every pool pick answered, and the evaluation picks matched: any audit scheme offline
            ev = _evaluate([Picks(p.name, p.x, p.y, z) for p, z in zip(picks, z_eval)], data["truth"], s, data["shapes"])
            yp = np.array([a.label for a in oracle.answer([Proposal(q[0], q[1], q[2], 0.0, "audit") for q in pool])])
            key = f"{dump['run']}_{budget}"
            for j, (pk, z) in enumerate(zip(picks, z_eval)):  # per evaluation micrograph, for audits held out of both
                e1 = _evaluate([Picks(pk.name, pk.x, pk.y, z)], data["truth"], s, data["shapes"])
                dump["arrays"].update({f"{key}_mic{j}_z": e1.scores, f"{key}_mic{j}_tp": e1.tp,
                                       f"{key}_mic{j}_ntrue": np.array([e1.n_true])})
            dump["arrays"].update({f"{key}_eval_z": ev.scores, f"{key}_eval_tp": ev.tp,
                                   f"{key}_eval_ntrue": np.array([ev.n_true]), f"{key}_cv_z": zc, f"{key}_cv_y": yc,
                                   f"{key}_pool_z": zp, f"{key}_pool_y": yp})
        w = 1.0 / (1.0 + np.exp(-zp))
        rng = np.random.default_rng(1000 + seed)
        for m in m_list:
            rows = []
            for _ in range(draws):
                take = rng.choice(len(pool), size=min(m, len(pool)), replace=False, p=w / w.sum())
                ans = oracle.answer([Proposal(pool[i][0], pool[i][1], pool[i][2], float(w[i]), "audit") for i in take])
                za, ya = zp[take], np.array([a.label for a in ans], float)
                fits = {"audit": platt_centred(za, ya), "audit+cv": platt_centred(za, ya, (cv.a, cv.b)),
                        "pooled": platt_centred(np.r_[zc, za], np.r_[yc, ya])}
                rows.append({k: scored(c, z_eval, picks, data["truth"], s, data["shapes"]) for k, c in fits.items()}
                            | {"positives": int(ya.sum())})
            out["audits"][m] = rows
        return out

    return extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="10028,10017")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--audits", default="10,20,30")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--at", default="50,100")
    ap.add_argument("--feature-model", default="resnet16_u32")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--tag", default="run")
    ap.add_argument("--dump", help="also write PREFIX_<dataset>.npz: each run's evaluation picks (probability, "
                                   "true or not), held-out answers and every audit candidate answered, for offline fits")
    a = ap.parse_args()
    m_list = [int(m) for m in a.audits.split(",")]
    at = {int(b) for b in a.at.split(",")}
    out = {"command": "python benchmarks/audit_probe.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "cache_dir"), "results": {}}
    recipe = get_recipe("default")
    for ds in a.datasets.split(","):
        s = BenchmarkSettings(**DATASETS[ds], budgets=(10, 25, 50, 100), batch=10, oracle="careful",
                              cache_dir=a.cache_dir, feature_model=a.feature_model, splits="all", calibrate=False)
        data = load_data(s, progress=lambda *_: None)
        runs, dump = [], {"arrays": {}}
        for si, train in enumerate(training_splits(sorted(data["items"]), s)):
            for seed in (int(x) for x in a.seeds.split(",")):
                got: dict = {}
                dump["run"] = f"s{si}_seed{seed}"
                r = run_one(s, recipe, seed, data, progress=lambda *_: None, train=train, labels_at=got,
                            extra=probe(s, data, m_list, a.draws, seed, at, got, dump))
                runs.append({"split": si, "seed": seed, "train": r["train"],
                             "budgets": {b["labels"]: b["extra"] for b in r["active"] if "extra" in b},
                             "ap": {b["labels"]: b["ap"] for b in r["active"]}})
                print(ds, si, seed, {b: round(v["cv"]["ratio"], 3) for b, v in runs[-1]["budgets"].items()}, flush=True)
        out["results"][ds] = runs
        write_json(ROOT / "benchmarks" / "results" / f"audit_probe_{a.tag}.json", out)
        if a.dump:
            np.savez_compressed(f"{a.dump}_{ds}.npz", **dump["arrays"])
        report(ds, runs, m_list)


def report(ds: str, runs: list[dict], m_list) -> None:
    for b in sorted({b for r in runs for b in r["budgets"]}):
        cells = [r["budgets"][b] for r in runs if b in r["budgets"]]
        print(f"{ds} @{b} labels, {len(cells)} runs: expected/true mean (worst) | F1 gap mean (worst)")
        for k in ("raw", "cv"):
            rat, gap = np.array([c[k]["ratio"] for c in cells]), np.array([c[k]["gap"] for c in cells])
            print(f"   {k:9s}        {rat.mean():.3f} ({rat[np.argmax(abs(rat - 1))]:.3f}) | {gap.mean():.4f} ({gap.max():.4f})")
        for m in m_list:
            for k in ("audit", "audit+cv", "pooled"):
                per_run = [(np.mean([d[k]["ratio"] for d in c["audits"][m]]), np.mean([d[k]["gap"] for d in c["audits"][m]]))
                           for c in cells]
                allr = np.array([d[k]["ratio"] for c in cells for d in c["audits"][m]])
                rat, gap = np.array([p[0] for p in per_run]), np.array([p[1] for p in per_run])
                within = float(np.mean(np.abs(allr - 1) <= 0.15))
                print(f"   {k:9s} m={m:3d}  {rat.mean():.3f} ({rat[np.argmax(abs(rat - 1))]:.3f}) | "
                      f"{gap.mean():.4f} ({gap.max():.4f}) | draws within 15%: {within:.2f}")


if __name__ == "__main__":
    main()
