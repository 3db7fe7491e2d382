"""Choosing what to label next: entropy peaks, spread out, never a spot already labelled."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .extract import _disc, _greedy, _ordered, nms, sigmoid


@dataclass
class Proposal:
    micrograph: str
    x: float  # original pixels
    y: float
    score: float  # probability under the current model
    kind: str  # 'uncertain', 'positive' (confident) or 'negative' (confident)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Binary entropy (nats) of sigmoid(logits), computed stably."""
    z = np.asarray(logits, dtype=np.float64)
    p = sigmoid(z)
    # H = log(1 + e^-|z|) + |z| * sigmoid(-|z|)
    a = np.abs(z)
    return (np.logaddexp(0.0, -a) + a * sigmoid(-a)).astype(np.float32) if p.size else p


def block_labelled(values: np.ndarray, iy: np.ndarray, ix: np.ndarray, radius: float, fill: float = -np.inf) -> np.ndarray:
    """Copy of ``values`` with a disc of ``radius`` around each labelled pixel set to ``fill``."""
    out = np.array(values, dtype=np.float32, copy=True)
    if len(iy) == 0:
        return out
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = xx * xx + yy * yy <= radius * radius
    dy, dx = yy[keep], xx[keep]
    ny, nx = out.shape
    Y = (np.asarray(iy)[:, None] + dy[None]).ravel()
    X = (np.asarray(ix)[:, None] + dx[None]).ravel()
    ok = (Y >= 0) & (Y < ny) & (X >= 0) & (X < nx)
    out[Y[ok], X[ok]] = fill
    return out


def peaks(values: np.ndarray, radius: float, exclude: tuple[np.ndarray, np.ndarray] | None = None,
          max_peaks: int | None = None, margin: int = 0):
    """Local peaks of ``values`` at least ``radius`` apart, outside labelled discs and an edge margin."""
    v = values
    if exclude is not None:
        v = block_labelled(v, exclude[0], exclude[1], radius)
    if margin > 0:
        v = np.array(v, dtype=np.float32, copy=True)
        v[:margin], v[-margin:], v[:, :margin], v[:, -margin:] = -np.inf, -np.inf, -np.inf, -np.inf
    iy, ix, val = nms(v, radius, threshold=-np.finfo(np.float32).max, max_picks=max_peaks)
    return iy, ix, val


def _blocked(shape: tuple[int, int], exclude, radius: float, margin: int) -> np.ndarray | None:
    """Flat mask of the pixels ``peaks`` sets to -inf (labelled discs, edge margin), or None."""
    if (exclude is None or len(exclude[0]) == 0) and margin <= 0:
        return None
    mask = np.zeros(shape, dtype=np.float32)
    if exclude is not None and len(exclude[0]):
        mask = block_labelled(mask, exclude[0], exclude[1], radius, fill=1.0)
    if margin > 0:
        mask[:margin], mask[-margin:], mask[:, :margin], mask[:, -margin:] = 1.0, 1.0, 1.0, 1.0
    return mask.ravel() != 0


def entropy_peaks(logits: np.ndarray, radius: float, k: int,
                  exclude: tuple[np.ndarray, np.ndarray] | None = None, margin: int = 0):
    """Same answer as ``peaks(entropy(logits), radius, exclude, max_peaks=k, margin)``, much less work.

    Why: a round needs ~10 uncertain peaks, yet the entropy of every pixel plus a full sort was most
    of the proposal time.  Entropy falls with |logit|, so only the pixels with the smallest |logit|
    can be peaks: their exact entropy is computed, the same greedy walk runs on them, and the result
    is accepted only when the k-th peak beats (by one float32 step) every pixel left out; else the
    candidate set grows.  Values are bit-identical to the full computation.
    """
    z = np.asarray(logits, dtype=np.float32)
    shape = z.shape
    zf = z.ravel()
    n = zf.size
    if k <= 0 or n == 0:
        e = np.empty(0, dtype=np.int64)
        return e, e, np.empty(0, dtype=np.float32)
    a = np.abs(zf)
    if np.isnan(a).any():
        return peaks(entropy(z), radius, exclude, max_peaks=k, margin=margin)
    blocked = _blocked(shape, exclude, radius, margin)
    area = _disc(max(radius, 0.0))[0].size
    m = max(4096, 4 * k * area)
    lowest = -np.finfo(np.float32).max
    while m < n:
        cut = float(np.partition(a, m - 1)[m - 1])
        lim = cut * (1.0 + 1e-3) + 1e-4  # a little past the m-th smallest |logit|, so the set is never empty
        cand = np.flatnonzero(a <= lim)
        hv = entropy(zf[cand])
        if blocked is not None:
            hv[blocked[cand]] = -np.inf
        vals = np.full(n, -np.inf, dtype=np.float32)
        vals[cand] = hv
        # every pixel left out has |logit| > lim, so its float32 entropy is at most one step above H(lim)
        ceiling = np.nextafter(entropy(np.array([lim]))[0], np.float32(np.inf))
        order = _ordered(vals, cand)
        order = order[vals[order] >= lowest]
        iy, ix, v = _greedy(order, vals, shape, radius, k)
        if v.size >= k and v[k - 1] > ceiling:
            return iy, ix, v
        m *= 4
    return peaks(entropy(z), radius, exclude, max_peaks=k, margin=margin)


def spread_in_features(points: np.ndarray, values: np.ndarray, k: int, centres: np.ndarray | None = None) -> list[int]:
    """Indices of ``k`` rows of ``points``: greedily the largest ``value * min(d / d0, 1)``.

    ``d`` is a row's feature-space distance to the nearest row chosen so far or to ``centres``
    (the labelled spots); ``d0`` the median distance between the candidates.  Why: the most
    uncertain peaks of one round are often the same kind of thing (one sort of junk, one ice
    edge), so a batch of them teaches little more than one.  Down-weighting a candidate that
    looks like something already chosen or labelled spreads the batch, while the cap at ``d0``
    keeps it from hunting the farthest outliers, as plain k-center does (measured: pure
    k-center cost up to 0.017 AP at 10-25 labels on EMPIAR-10017; this form did not).
    """
    P = np.asarray(points, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    n = P.shape[0]
    if k >= n:
        return list(range(n))
    sq = (P * P).sum(1)

    def dist2(rows: np.ndarray) -> np.ndarray:  # squared distance of every point to its nearest row
        rows = np.asarray(rows, dtype=np.float64)
        return np.maximum(sq[:, None] + (rows * rows).sum(1)[None] - 2.0 * (P @ rows.T), 0.0).min(1)

    pair = np.maximum(sq[:, None] + sq[None] - 2.0 * (P @ P.T), 0.0)[np.triu_indices(n, 1)]
    d0 = max(float(np.median(pair)), 1e-12)
    d = np.full(n, np.inf)
    if centres is not None and len(centres):
        d = np.min([dist2(centres[i : i + 4096]) for i in range(0, len(centres), 4096)], axis=0)
    chosen: list[int] = []
    while len(chosen) < k:
        gain = v * np.minimum(np.sqrt(d / d0), 1.0)
        gain[chosen] = -np.inf
        j = int(np.argmax(gain))
        chosen.append(j)
        d = np.minimum(d, dist2(P[j : j + 1]))
    return chosen
