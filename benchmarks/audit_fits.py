"""Calibration maps fitted offline on what benchmarks/audit_probe.py --dump saved (issue 16, item 3).

Each run of the dump holds, at one budget: the evaluation picks (raw logit, true or not, the true
count), the held-out answers (logit, answer) and every audit candidate of the training
micrographs with its oracle answer.  Drawing ``m`` audits in proportion to probability is then a
resampling, so many maps and audit counts are compared in seconds, on exactly the runs the
benchmark made.  Maps:

- ``raw``, ``cv`` (the package's: Platt on the held-out answers, identity prior, 60-answer gate);
- ``audit+cv``: Platt on the audits, prior centred on ``cv`` (the package's map with audits);
- ``ceiling``: ``c * sigmoid(cv logit)``, ``c`` (<= 1) the MAP of the audits under that model with a
  Beta(2, 1)-like weak prior: the share of confident picks that are not particles, which an affine
  map in the logit cannot represent;
- ``ceiling+slope``: ``c * sigmoid(a z + b)``, (a, b) centred on ``cv`` and fitted with ``c`` on the audits.

    python benchmarks/audit_fits.py /work/dump_10028.npz /work/dump_10017.npz --audits 10,20,30 --draws 20
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from scipy.optimize import minimize

from cryoal_ext.calibration import CalibrationSettings, platt


def sig(z):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, float)))


def suggest(p: np.ndarray) -> float:
    s = np.sort(p)[::-1]
    f1 = 2 * np.cumsum(s) / (np.arange(1, s.size + 1) + s.sum())
    return float(s[int(np.argmax(f1))])


def score(p: np.ndarray, tp: np.ndarray, n_true: int, order: np.ndarray) -> tuple[float, float]:
    """(expected / true count, F1 lost by the suggested threshold) for probabilities ``p`` of the picks."""
    t = suggest(p)
    keep = p >= t
    f1 = 2 * tp[keep].sum() / (keep.sum() + n_true)
    ctp = np.cumsum(tp[order])
    best = np.max(2 * ctp / (np.arange(1, ctp.size + 1) + n_true))
    return float(p.sum() / n_true), float(best - f1)


def fit_ceiling(za, ya, a, b, slope: bool, prior_sd: float = 1.0):
    """MAP (c, a, b) of ``c * sigmoid(a z + b)`` on audits; c = sigmoid(u), prior on u ~ N(3, 1.5); (a, b) ~ N(centre, sd)."""
    centre = np.array([a, b])

    def nll(th):
        u, ab = th[0], (th[1:] if slope else centre)
        c = sig(u)
        p = np.clip(c * sig(ab[0] * za + ab[1]), 1e-12, 1 - 1e-12)
        f = -np.sum(ya * np.log(p) + (1 - ya) * np.log1p(-p)) + 0.5 * ((u - 3.0) / 1.5) ** 2
        if slope:
            f += 0.5 * np.sum((ab - centre) ** 2) / prior_sd ** 2
        return f

    x0 = np.r_[3.0, centre] if slope else np.array([3.0])
    r = minimize(nll, x0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
    u = r.x[0]
    ab = r.x[1:] if slope else centre
    return sig(u), max(ab[0], 0.05), ab[1]


def runs_of(path: str):
    d = np.load(path)
    keys = sorted({k.rsplit("_", 2)[0] for k in d.files if k.endswith("_eval_z")})
    for k in keys:
        r = {f: d[f"{k}_{f}"] for f in ("eval_z", "eval_tp", "eval_ntrue", "cv_z", "cv_y", "pool_z", "pool_y")}
        j, mics = 0, []
        while f"{k}_mic{j}_z" in d.files:
            mics.append((d[f"{k}_mic{j}_z"], d[f"{k}_mic{j}_tp"].astype(float), int(d[f"{k}_mic{j}_ntrue"][0])))
            j += 1
        r["mics"] = mics
        yield k, r


def other_micrographs(r: dict, ms, draws: int, rng) -> dict:
    """Audits on micrographs neither trained on nor scored: each evaluation micrograph's picks are
    calibrated on audits drawn from the other evaluation micrographs' picks (their match is the answer);
    then all picks are pooled and scored as one set.  Returns map -> m -> [(ratio, gap) per draw]."""
    mics = r["mics"]
    cv = platt(r["cv_z"], r["cv_y"], CalibrationSettings())
    z_all = np.concatenate([m[0] for m in mics])
    tp_all = np.concatenate([m[1] for m in mics])
    nt = sum(m[2] for m in mics)
    order = np.argsort(-z_all, kind="stable")
    out = {}
    for m in ms:
        for _ in range(draws):
            parts = {"audit+cv": [], "ceiling": [], "audit-free": []}
            for j in range(len(mics)):
                oz = np.concatenate([mics[i][0] for i in range(len(mics)) if i != j])
                oy = np.concatenate([mics[i][1] for i in range(len(mics)) if i != j])
                w = sig(oz)
                take = rng.choice(w.size, size=min(m, w.size), replace=False, p=w / w.sum())
                za, ya = oz[take], oy[take]
                z = mics[j][0]
                ac = platt(za, ya, CalibrationSettings(), centre=(cv.a, cv.b), min_n=1)
                parts["audit+cv"].append(sig(ac.a * z + ac.b))
                c, _, _ = fit_ceiling(za, ya, cv.a, cv.b, slope=False)
                parts["ceiling"].append(c * sig(cv.a * z + cv.b))
                fr = platt(za, ya, CalibrationSettings(), min_n=1)  # identity prior, no cv centre
                parts["audit-free"].append(sig(fr.a * z + fr.b))
            for k, ps in parts.items():
                out.setdefault(k, {}).setdefault(m, []).append(score(np.concatenate(ps), tp_all, nt, order))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dumps", nargs="+")
    ap.add_argument("--audits", default="10,20,30")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--other-micrographs", action="store_true",
                    help="audits on evaluation micrographs other than the one calibrated (held out of training and scoring)")
    a = ap.parse_args()
    ms = [int(m) for m in a.audits.split(",")]
    for path in a.dumps:
        res = defaultdict(list)  # (map, m) -> [(ratio, gap) per run, averaged over draws]
        worst = defaultdict(list)
        for key, r in runs_of(path):
            if a.other_micrographs:
                if len(r["mics"]) < 2:
                    continue
                o = other_micrographs(r, ms, a.draws, np.random.default_rng(0))
                for k, bym in o.items():
                    for m, v in bym.items():
                        v = np.array(v)
                        res[k, m].append(tuple(v.mean(0)))
                        worst[k, m].append(v)
                cv = platt(r["cv_z"], r["cv_y"], CalibrationSettings())
                z_all = np.concatenate([mm[0] for mm in r["mics"]])
                tp_all = np.concatenate([mm[1] for mm in r["mics"]])
                order = np.argsort(-z_all, kind="stable")
                nt = sum(mm[2] for mm in r["mics"])
                res["raw", 0].append(score(sig(z_all), tp_all, nt, order))
                res["cv", 0].append(score(sig(cv.a * z_all + cv.b), tp_all, nt, order))
                continue
            z, tp, nt = r["eval_z"], r["eval_tp"].astype(float), int(r["eval_ntrue"][0])
            order = np.argsort(-z, kind="stable")
            cv = platt(r["cv_z"], r["cv_y"], CalibrationSettings())
            res["raw", 0].append(score(sig(z), tp, nt, order))
            res["cv", 0].append(score(sig(cv.a * z + cv.b), tp, nt, order))
            w = sig(r["pool_z"])
            rng = np.random.default_rng(0)
            for m in ms:
                cells = defaultdict(list)
                for _ in range(a.draws):
                    take = rng.choice(w.size, size=min(m, w.size), replace=False, p=w / w.sum())
                    za, ya = r["pool_z"][take], r["pool_y"][take].astype(float)
                    ac = platt(za, ya, CalibrationSettings(), centre=(cv.a, cv.b), min_n=1)
                    cells["audit+cv"].append(score(sig(ac.a * z + ac.b), tp, nt, order))
                    c, _, _ = fit_ceiling(za, ya, cv.a, cv.b, slope=False)
                    cells["ceiling"].append(score(c * sig(cv.a * z + cv.b), tp, nt, order))
                    c2, a2, b2 = fit_ceiling(za, ya, cv.a, cv.b, slope=True)
                    cells["ceiling+slope"].append(score(c2 * sig(a2 * z + b2), tp, nt, order))
                for k, v in cells.items():
                    v = np.array(v)
                    res[k, m].append(tuple(v.mean(0)))
                    worst[k, m].append(v)
        print(path)
        for (k, m), v in res.items():
            v = np.array(v)
            allv = np.concatenate(worst[k, m]) if (k, m) in worst else v
            rat, gap = v[:, 0], v[:, 1]
            print(f"  {k:14s} m={m:3d} runs {len(v):2d} | count mean {rat.mean():.3f} worst run {rat[np.argmax(abs(rat - 1))]:.3f}"
                  f" | F1 lost mean {gap.mean():.4f} worst run {gap.max():.4f} | draws: count within 15% "
                  f"{np.mean(abs(allv[:, 0] - 1) <= 0.15):.2f}, F1 lost <= 0.02 {np.mean(allv[:, 1] <= 0.02):.2f}")


if __name__ == "__main__":
    main()
