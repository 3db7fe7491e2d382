"""Topaz's GMM micrograph normalisation, fitted to every pixel at the cost of a sort and a histogram.

Why: the pretrained backbone expects images normalised as ``topaz preprocess`` does it: a
two-component Gaussian mixture with a shared variance and a Beta(alpha=900, beta=1) prior on
the weight of component 1, fitted by EM from 12 initial weights (0.1 ... 0.98 and a
one-component model), the fit with the highest log posterior deciding the mean and scale.
Topaz fits it with a Python loop of small torch ops over the pixels (5-10 s per 686^2 image for
all pixels), which made normalisation, not the network, the bottleneck of prediction on a GPU.

Here the same model, the same initialisations and the same stopping rule run on a histogram of
ALL pixels, all initialisations at once as numpy arrays:

* one sort of the pixels gives the exact initial split of each initialisation (the quantile,
  as Topaz takes it); a bin edge at each split makes the initial counts, sums and sums of
  squares exact sums of whole bins;
* the bins are cut where a uniform grid over the value range OR an equal-count grid would cut
  (so no bin is wide where the pixels are dense nor where the mixture's responsibilities change
  fast); each bin carries its pixels' count, mean and spread, so the M-step's sums are exact
  but for the responsibilities being taken at the bin mean, and the log posterior gets a
  second-order correction for the spread within each bin;
* Topaz's EM stops when the log posterior, which it sums in float32, rises by no more than
  1e-3; with ~10^6 pixels that is "no longer rises in float32", which is emulated by comparing
  the float32-rounded log posteriors.  Each initialisation stops on its own, as in Topaz;
* on some micrographs (EMPIAR-10017) several initialisations stop on one flat ridge with log
  posteriors within float32 noise of each other, and which of them Topaz returns is decided by
  rounding (the same pixels transposed move its answer by up to 0.02).  There the fit is taken
  to the ridge's optimum (EM from the best one to convergence), which lies between them.

Agreement with Topaz's full fit (``topaz.stats.normalize(x, alpha=900, beta=1, num_iters=100,
sample=1)``) is checked on real micrographs by tests/test_normalise.py and measured by
benchmarks/normalise_speed.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Topaz's initial weights of component 1; 1.0 is the one-component model
INITIAL_PIS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)


@dataclass(frozen=True)
class GMMSettings:
    """The model (Topaz's defaults for ``topaz preprocess``) and the histogram's resolution."""

    alpha: float = 900.0
    beta: float = 1.0
    num_iters: int = 100
    tol: float = 1e-3
    bins: int = 256  # per grid: the bins are cut by a uniform grid and an equal-count grid of this many
    tie: float = 2.0  # fits whose log posteriors are this close (nats) are the same to Topaz's float32 sums
    converge_iters: int = 500  # EM steps allowed to settle a tie on the ridge's optimum


@dataclass(frozen=True)
class GMMFit:
    """The chosen fit (component 1's mean and standard deviation scale the image) and every candidate's."""

    mu: float
    std: float
    pi: float
    logp: float
    mus: np.ndarray
    stds: np.ndarray
    pis: np.ndarray
    logps: np.ndarray
    iterations: np.ndarray  # EM steps taken by each initialisation (0 for the one-component model)


def _beta_logpdf(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """log Beta(p; a, b) for 0 < p < 1 (scipy.stats.beta.logpdf without the import cost)."""
    lognorm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return lognorm + (a - 1.0) * np.log(p) + (b - 1.0) * np.log1p(-p)


def _beta_pdf_at_one(a: float, b: float) -> float:
    """Beta(1; a, b): Topaz adds this density (not its log) to the one-component model's log likelihood."""
    if b < 1:
        return math.inf
    if b > 1:
        return 0.0
    return math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))


def _quantiles_of_sorted(xs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """numpy's default (linear) quantiles of an already sorted array, without sorting it again."""
    pos = q * (xs.size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, xs.size - 1)
    t = pos - lo
    a, b = xs[lo].astype(np.float64), xs[hi].astype(np.float64)
    return np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)


@dataclass
class _Bins:
    """A histogram of the pixels with what EM needs of each bin, in a frame centred on the median."""

    m: np.ndarray  # mean of the pixels in each bin
    cnt: np.ndarray  # pixels per bin
    spread: np.ndarray  # sum of (x - bin mean)^2 within each bin
    cols: np.ndarray  # (bins, 4): count, sum, sum of squares, spread: one matmul gives all M-step sums
    tot: np.ndarray  # cols summed over the bins
    n: int
    mean: float


def _histogram(xs: np.ndarray, centre: float, bins: int, cuts: np.ndarray) -> tuple[_Bins, np.ndarray]:
    """Bins of the sorted pixels ``xs``: edges of a uniform grid, of an equal-count grid and at ``cuts``.

    Returns the bins and, for each cut, the index of the first bin above it (so sums over the
    pixels below a cut are exact sums of whole bins).
    """
    n = xs.size
    c = xs.astype(np.float64) - centre  # centred: the sums of squares keep their precision
    edges_u = np.searchsorted(c, np.linspace(c[0], c[-1], bins + 1)[1:-1], side="left")
    edges_q = np.linspace(0, n, bins + 1).round().astype(np.int64)[1:-1]
    idx = np.unique(np.concatenate(([0, n], edges_u, edges_q, cuts)))
    idx = idx[idx < n]  # bin starts (reduceat: each bin runs to the next start)
    s1 = np.add.reduceat(c, idx)
    s2 = np.add.reduceat(c * c, idx)
    cnt = np.diff(np.append(idx, n)).astype(np.float64)
    m = s1 / cnt
    spread = np.maximum(s2 - s1 * m, 0.0)
    cols = np.stack([cnt, s1, s2, spread], axis=1)
    tot = cols.sum(axis=0)
    return _Bins(m, cnt, spread, cols, tot, n, float(tot[1] / n)), np.searchsorted(idx, cuts, side="left")


_LOG2PI = math.log(2 * math.pi)


def _posterior(b: _Bins, mu0, mu1, var, pi, alpha: float, beta: float):
    """Log posterior of each parameter row, and (responsibility of component 1 per bin) @ b.cols."""
    # shared variance: log p1 - log p0 is linear in x, so the responsibility is a sigmoid of it
    g = (mu1 - mu0) / var
    u = g[:, None] * (b.m[None, :] - (0.5 * (mu0 + mu1))[:, None]) + (np.log(pi) - np.log1p(-pi))[:, None]
    r1 = 0.5 * (1.0 + np.tanh(0.5 * u))
    # sum over pixels of log p0(x) is exact from the moments; log(p0 + p1) = log p0 + softplus(u)
    sq0 = b.tot[2] - 2 * mu0 * b.tot[1] + b.n * mu0 * mu0
    l0 = -sq0 / (2 * var) - b.n * 0.5 * (_LOG2PI + np.log(var)) + b.n * np.log1p(-pi)
    a = r1 @ b.cols
    # second order in the spread within each bin: d2 softplus(u)/dx2 = r0 r1 g^2
    corr = 0.5 * g * g * (a[:, 3] - (r1 * r1) @ b.spread)
    return l0 + np.logaddexp(0.0, u) @ b.cnt + corr + _beta_logpdf(pi, alpha, beta), a


def _m_step(b: _Bins, a: np.ndarray, alpha: float, beta: float):
    """Topaz's M-step: MAP weight under the Beta prior, weighted means, one shared variance."""
    n = b.n
    sw1, sm1, sq1 = a[:, 0], a[:, 1], a[:, 2]
    sw0, sm0, sq0 = n - sw1, b.tot[1] - sm1, b.tot[2] - sq1
    pi = (alpha - 1 + sw1) / (alpha + beta - 2 + n)
    mu1 = np.where(sw1 > 0, sm1 / np.where(sw1 > 0, sw1, 1), b.mean)
    mu0 = np.where(sw0 > 0, sm0 / np.where(sw0 > 0, sw0, 1), b.mean)
    var = (sq1 - 2 * mu1 * sm1 + sw1 * mu1 ** 2 + sq0 - 2 * mu0 * sm0 + sw0 * mu0 ** 2) / n
    return mu0, mu1, var, pi


def _em(b: _Bins, params: tuple, s: GMMSettings, max_iter: int, topaz_stop: bool):
    """EM from ``params`` (rows: one per initialisation); each row stops on its own.

    ``topaz_stop``: Topaz's rule (log posterior, rounded to float32 as Topaz sums it, rises by
    <= tol); otherwise run until the parameters move by less than 1e-7 (converged).
    Returns the parameters, the log posteriors and the steps taken per row.
    """
    mu0, mu1, var, pi = params
    logp, a = _posterior(b, mu0, mu1, var, pi, s.alpha, s.beta)
    active = np.ones(len(pi), dtype=bool)
    iters = np.zeros(len(pi), dtype=np.int64)
    for _ in range(int(max_iter)):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        new = _m_step(b, a[rows], s.alpha, s.beta)
        new_logp, new_a = _posterior(b, *new, s.alpha, s.beta)
        if topaz_stop:
            done = np.float32(new_logp) - np.float32(logp[rows]) <= s.tol
        else:
            done = (np.abs(new[1] - mu1[rows]) < 1e-7) & (np.abs(np.sqrt(new[2]) - np.sqrt(var[rows])) < 1e-7)
        mu0[rows], mu1[rows], var[rows], pi[rows] = new  # the step just taken is kept, as in Topaz
        logp[rows], a[rows] = new_logp, new_a
        iters[rows] += 1
        active[rows[done]] = False
    return (mu0, mu1, var, pi), logp, iters


def fit_gmm(image: np.ndarray, settings: GMMSettings | None = None) -> GMMFit:
    """Topaz's normalisation fit on all pixels of ``image`` (any shape), via a sort and a histogram."""
    s = settings or GMMSettings()
    x = np.asarray(image, dtype=np.float32).ravel()
    n = x.size
    if n < 2:
        raise ValueError("fit_gmm needs at least two pixels")
    xs = np.sort(x)
    centre = float(xs[n // 2])
    pi = np.asarray([p for p in INITIAL_PIS if p < 1.0], dtype=np.float64)
    # Topaz's initial hard split at its quantiles: pixels <= split start in component 0
    cuts = np.searchsorted(xs.astype(np.float64), _quantiles_of_sorted(xs, 1.0 - pi), side="right")
    b, first_above = _histogram(xs, centre, s.bins, cuts)
    below = np.concatenate(([np.zeros(4)], np.cumsum(b.cols, axis=0)))[first_above]  # exact sums below each cut
    n0, s0, q0 = below[:, 0], below[:, 1], below[:, 2]
    n1, s1, q1 = n - n0, b.tot[1] - s0, b.tot[2] - q0
    mu0 = np.where(n0 > 0, s0 / np.maximum(n0, 1), b.mean)
    mu1 = np.where(n1 > 0, s1 / np.maximum(n1, 1), b.mean)
    var = (q0 - 2 * mu0 * s0 + n0 * mu0 ** 2 + q1 - 2 * mu1 * s1 + n1 * mu1 ** 2) / n
    (mu0, mu1, var, pi), logp, iters = _em(b, (mu0, mu1, var, pi.copy()), s, s.num_iters, topaz_stop=True)

    # the one-component model: mean and unbiased variance of all pixels, plus Topaz's bonus Beta(1; a, b)
    var_one = (b.tot[2] / n - b.mean ** 2) * n / (n - 1)
    logp_one = -0.5 * (n - 1) - 0.5 * n * (_LOG2PI + math.log(var_one)) + _beta_pdf_at_one(s.alpha, s.beta)
    mus = np.append(mu1, b.mean) + centre
    stds = np.sqrt(np.append(var, var_one))
    pis = np.append(pi, 1.0)
    logps = np.append(logp, logp_one)
    best = int(np.argmax(logps))
    mu, std, p = float(mus[best]), float(stds[best]), float(pis[best])
    near = np.flatnonzero(logps >= logps[best] - s.tie)
    if s.tie > 0 and near.size > 1 and np.all(pis[near] < 1.0):
        # Several initialisations ended on one flat ridge within float32 noise of each other: which
        # one Topaz returns is decided by rounding.  The ridge's optimum is the fit closest to all of them.
        row = (mu0[[best]], mu1[[best]], var[[best]], pi[[best]])
        (_, m1, v1, p1), _, _ = _em(b, tuple(np.copy(r) for r in row), s, s.converge_iters, topaz_stop=False)
        mu, std, p = float(m1[0] + centre), float(np.sqrt(v1[0])), float(p1[0])
    return GMMFit(mu, std, p, float(logps[best]), mus, stds, pis, logps, np.append(iters, 0))
