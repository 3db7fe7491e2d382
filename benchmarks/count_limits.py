"""How close can audits bring the expected count, and is its range honest? (issue 16, item 3; offline)

Reads the dumps of ``training_audits.py --dump`` (every pick's raw logit at 100 labels, on the
training and on the evaluated micrographs, whether it is an expert pick, and the package's map
from the held-out answers).  Each draw takes ``m`` audits from the training micrographs' picks in
proportion to p (as the default does), answers them from the expert picks, and maps the
evaluated picks with the result; 20 draws per split.  The audits are not trained on here.

1. ``--what needed``: the package's map (Platt, prior sd 1 centred on the answers' map) for
   m = 15 (what the default has at 100 labels) up to 1000: how many audits the 15% goal needs.
2. ``--what estimators``: other ways to use the same audits (a tighter prior; moving the
   intercept only, with prior sd 1 / 0.5 / none; a ceiling on the answers' map, ``fit_ceiling``).
3. ``--what ranges``: the expected count's range (``calibration.count_estimate``, the delta
   method on the map's Laplace covariance): how often it holds the expert count.
4. ``--what thresholds``: the suggested threshold (the expected F1's maximum under the fitted
   map) against the maximum of the expected F1 averaged over the map's Laplace posterior (200
   samples of ``(a, b)``): does weighing the map's uncertainty lose less F1?

    python benchmarks/count_limits.py --what needed
    python benchmarks/count_limits.py --what estimators
    python benchmarks/count_limits.py --what ranges
    python benchmarks/count_limits.py --what thresholds
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from cryoal_ext.calibration import Calibration, CalibrationSettings, count_estimate, platt
from cryoal_ext.extract import sigmoid
from training_audits import RESULTS, f1_lost  # the dumps' own script: its folder and its F1 measure


def draws(tag: str, m: int, n_draws: int):
    """(evaluated logits, their hits, expert count, audited logits, their answers, the answers' map) per draw."""
    d = np.load(RESULTS / f"training_audits_{tag}.npz")
    for s in sorted({k.split("_")[0] for k in d.files}):
        ze, ye, ne = d[f"{s}_ze"].astype(float), d[f"{s}_ye"], int(d[f"{s}_ne"])
        zt, yt = d[f"{s}_zt"].astype(float), d[f"{s}_yt"]
        a, b = d[f"{s}_ab"]
        w = sigmoid(a * zt + b)
        for k in range(n_draws):
            i = np.random.default_rng(k).choice(zt.size, min(m, zt.size), replace=False, p=w / w.sum())
            yield ze, ye, ne, zt[i], yt[i].astype(float), (a, b)


@dataclass(frozen=True)
class Ceiling:
    """``P(y=1) = c * sigmoid(a z + b)``: the answers' map, capped at the precision the audits find among the picks."""

    a: float
    b: float
    c: float

    def prob(self, z):
        return self.c * sigmoid(self.a * np.asarray(z, dtype=np.float64) + self.b)


def fit_ceiling(z: np.ndarray, y: np.ndarray, centre: tuple[float, float], k: float) -> Ceiling:
    """The centre map kept, its ceiling ``c`` from the audits (MAP, as if ``k`` more audits agreed with c = 1).

    Why: an audit is a confident pick (held-out logits 2-4); when some of those are not particles, an
    affine map can only say so by flattening, which raises every low pick's probability with them.
    """
    a, b = centre
    q = sigmoid(a * z + b)

    def loss(c):
        p = np.clip(c * q, 1e-9, 1 - 1e-9)
        return -(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)) + k * np.log(c))

    return Ceiling(a, b, float(minimize_scalar(loss, bounds=(0.05, 1.0), method="bounded").x))


def fit(how: str, z: np.ndarray, y: np.ndarray, centre: tuple[float, float]) -> Calibration | Ceiling:
    """The map from the audits: ``platt<sd>`` (both parameters), ``shift<sd>`` (the intercept only) or
    ``ceiling<k>`` (the centre map times the picks' precision, ``fit_ceiling``)."""
    if how.startswith("ceiling"):
        return fit_ceiling(z, y, centre, float(how[7:]))
    sd = float(how[5:])
    if how.startswith("platt"):
        return platt(z, y, CalibrationSettings(prior_sd=sd), centre=centre, min_n=1)
    a, b = centre

    def score(delta):  # the MAP condition for the shift, prior N(0, sd^2)
        return np.sum(y - sigmoid(a * z + b + delta)) - delta / sd ** 2

    return Calibration(a=a, b=b + brentq(score, -30, 30))


def count_row(tag: str, m: int, how: str, n_draws: int) -> str:
    ratio, lost = [], []
    for ze, ye, ne, z, y, centre in draws(tag, m, n_draws):
        cal = fit(how, z, y, centre)
        p = cal.prob(ze)
        ratio.append(p.sum() / ne)
        lost.append(f1_lost(p, ye, ne))
    r, g = np.array(ratio), np.array(lost)
    return (f"| {tag} | {m} | {how} | {r.mean():.3f} (sd {r.std():.3f}; worst {r[np.argmax(abs(r - 1))]:.3f}) | "
            f"{np.mean(abs(r - 1) <= 0.15):.0%} | {g.mean():.3f} ({g.max():.3f}; {np.mean(g <= 0.02):.0%}) |")


def range_row(tag: str, m: int, level: float, n_draws: int) -> str:
    inside, width, below, above = [], [], 0, 0
    for ze, ye, ne, z, y, centre in draws(tag, m, n_draws):
        cal = fit("platt1", z, y, centre)
        est = count_estimate(cal.prob(ze), cal, level)
        inside.append(est.low <= ne <= est.high)
        width.append((est.high - est.low) / ne)
        below += ne < est.low
        above += ne > est.high
    return (f"| {tag} | {m} | {level:.0%} | {np.mean(inside):.0%} | {below} / {above} | {np.mean(width):.2f} |")


def posterior_f1_lost(z: np.ndarray, hit: np.ndarray, n_true: int, cal: Calibration, samples: int = 200,
                      seed: int = 0) -> float:
    """F1 lost at the rank that maximises the expected F1 averaged over the map's Laplace posterior."""
    order = np.argsort(-z)
    zs, hs = z[order], hit[order].astype(float)
    va, cab, vb = cal.cov
    ab = np.random.default_rng(seed).multivariate_normal([cal.a, cal.b], [[va, cab], [cab, vb]], size=samples)
    p = sigmoid(ab[:, :1] * zs[None, :] + ab[:, 1:])
    k = np.arange(1, zs.size + 1)
    ef1 = (2 * np.cumsum(p, axis=1) / (k[None, :] + p.sum(axis=1, keepdims=True))).mean(axis=0)
    f1 = 2 * np.cumsum(hs) / (k + n_true)
    return float(f1.max() - f1[int(np.argmax(ef1))])


def threshold_row(tag: str, m: int, n_draws: int) -> str:
    plug, post = [], []
    for ze, ye, ne, z, y, centre in draws(tag, m, n_draws):
        cal = fit("platt1", z, y, centre)
        plug.append(f1_lost(cal.prob(ze), ye, ne))
        post.append(posterior_f1_lost(ze, ye, ne, cal))
    cells = [f"{g.mean():.3f} ({g.max():.3f}; {np.mean(g <= 0.02):.0%})" for g in (np.array(plug), np.array(post))]
    return f"| {tag} | {m} | {cells[0]} | {cells[1]} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=("needed", "estimators", "ranges", "thresholds"), default="needed")
    ap.add_argument("--tags", default="10028,10017")
    ap.add_argument("--draws", type=int, default=20)
    a = ap.parse_args()
    tags = a.tags.split(",")
    if a.what == "thresholds":
        print("| dump | audits | F1 lost, suggested threshold: mean (worst; within 0.02) | F1 lost, posterior-averaged |")
        print("|---|---|---|---|")
        for tag in tags:
            for m in (15, 30, 120):
                print(threshold_row(tag, m, a.draws))
        return
    if a.what == "ranges":
        print("| dump | audits | range | expert count inside | below / above it | width / expert count |")
        print("|---|---|---|---|---|---|")
        for tag in tags:
            for m in (15, 30):
                for level in (0.8, 0.9):
                    print(range_row(tag, m, level, a.draws))
        return
    print("| dump | audits | map | sum of p / expert count: mean (sd; worst) | within 15% | F1 lost: mean (worst; within 0.02) |")
    print("|---|---|---|---|---|---|")
    for tag in tags:
        if a.what == "needed":
            for m in (15, 30, 60, 120, 1000):
                print(count_row(tag, m, "platt1", a.draws))
        else:
            for m in (15, 30):
                for how in ("platt1", "platt0.5", "shift1", "shift0.5", "shift100", "ceiling0", "ceiling2"):
                    print(count_row(tag, m, how, a.draws))


if __name__ == "__main__":
    main()
