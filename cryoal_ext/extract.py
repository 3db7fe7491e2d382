"""Picking: greedy non-maximum suppression on a score map, and conversion back to file pixels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .coords import Frame

MIN_PICK_SCORE = 1e-4  # picks below this probability are dropped: far below any threshold a user would choose


def _disc(radius: float) -> tuple[np.ndarray, np.ndarray]:
    r = int(np.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = xx * xx + yy * yy <= radius * radius
    return yy[keep], xx[keep]


def _capped(radius: float, shape: tuple[int, int]) -> float:
    """The suppression radius, at most the image diagonal: a larger disc suppresses exactly the same pixels,
    and its offsets would need memory growing with radius squared (a 1e5 A particle: 20+ GB)."""
    return min(max(float(radius), 0.0), float(np.hypot(*shape)) + 1.0)


def nms(score: np.ndarray, radius: float, threshold: float | None = None, max_picks: int | None = None):
    """Greedy NMS: repeatedly take the best remaining pixel and suppress a disc of ``radius`` around it.

    Exact (same answer as the brute-force loop) but walks the sorted pixels in vectorised chunks.
    Returns (iy, ix, values) in descending score order.  Ties break by raster order.  With
    ``max_picks`` only the best pixels are sorted (``nms_top``): same answer, a fraction of the work.
    """
    if max_picks is not None:
        return nms_top(score, radius, max_picks, threshold)
    flat = score.ravel()
    order = np.argsort(-flat, kind="stable")
    if threshold is not None:
        order = order[flat[order] >= threshold]
    return _greedy(order, flat, score.shape, radius, None)


def _greedy(order: np.ndarray, flat: np.ndarray, shape: tuple[int, int], radius: float, max_picks: int | None):
    """Greedy suppression along ``order`` (pixel indices, best first)."""
    ny, nx = shape
    dy, dx = _disc(_capped(radius, shape))
    suppressed = np.zeros(ny * nx, dtype=bool)
    picks: list[int] = []
    pos, chunk = 0, 2048
    n = order.size
    while pos < n:
        block = order[pos : pos + chunk]
        free = np.flatnonzero(~suppressed[block])
        if free.size == 0:
            pos += block.size
            chunk = min(chunk * 2, 1 << 16)
            continue
        pos += int(free[0])
        idx = int(order[pos])
        picks.append(idx)
        if max_picks is not None and len(picks) >= max_picks:
            break
        y, x = divmod(idx, nx)
        yy, xx = y + dy, x + dx
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        suppressed[yy[ok] * nx + xx[ok]] = True
        pos += 1
        chunk = 2048
    picks = np.asarray(picks, dtype=np.int64)
    iy, ix = np.divmod(picks, nx)
    return iy, ix, flat[picks]


def _ordered(flat: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """``cand`` (ascending pixel indices) in the order ``np.argsort(-flat, kind='stable')`` visits them."""
    return cand[np.argsort(-flat[cand], kind="stable")]


def nms_top(score: np.ndarray, radius: float, k: int, threshold: float | None = None,
            first: int | None = None):
    """The first ``k`` picks of ``nms(score, radius, threshold)``, sorting only the best pixels.

    Why: proposals need ~10 peaks per micrograph, and sorting every pixel dominates the round.
    Exact: it sorts the ``m`` best pixels (every pixel tied with the m-th included), runs the same
    greedy walk, and accepts the result only if the k-th pick came from inside that set (every
    other pixel scores lower, so the full walk would have reached the same picks); else m grows.
    """
    flat = score.ravel()
    n = flat.size
    if k <= 0:
        e = np.empty(0, dtype=np.int64)
        return e, e, flat[:0]
    area = _disc(_capped(radius, score.shape))[0].size
    m = first or max(4096, 4 * k * area)
    if np.isnan(flat).any():
        m = n  # NaN has no place in a partial order: take the exact full path
    while True:
        if m >= n:
            order = np.argsort(-flat, kind="stable")
            if threshold is not None:
                order = order[flat[order] >= threshold]
            return _greedy(order, flat, score.shape, radius, k)
        cut = np.partition(flat, n - m)[n - m]
        cand = np.flatnonzero(flat >= cut)
        order = _ordered(flat, cand)
        if threshold is not None:
            order = order[flat[order] >= threshold]
        iy, ix, v = _greedy(order, flat, score.shape, radius, k)
        if v.size >= k or (threshold is not None and threshold >= cut):
            # complete, or every pixel passing the threshold was in the set
            return iy, ix, v
        m *= 4


def sigmoid(z):
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


@dataclass
class Picks:
    """Picks of one micrograph in original file pixels, with probabilities."""

    name: str
    x: np.ndarray
    y: np.ndarray
    score: np.ndarray  # probability in [0, 1]

    def __len__(self) -> int:
        return int(self.x.size)

    def above(self, threshold: float) -> "Picks":
        keep = self.score >= threshold
        return Picks(self.name, self.x[keep], self.y[keep], self.score[keep])


def extract_picks(
    name: str,
    logits: np.ndarray,
    frame: Frame,
    radius_px: float,
    threshold: float | None = None,
    min_score: float = MIN_PICK_SCORE,
) -> Picks:
    """NMS on a working-scale logit map with the particle radius; scores become probabilities.

    ``radius_px`` is in original pixels; ``threshold`` is a probability.  ``min_score`` drops the
    hopeless tail so files stay small (it is far below any threshold a user would choose).
    ``logits`` may be a torch tensor: the NMS then runs on its device (``nms_torch``, same picks).
    """
    floor = max(threshold or 0.0, min_score)
    logit_floor = float(np.log(floor / (1.0 - floor))) if 0 < floor < 1 else None
    if isinstance(logits, np.ndarray):
        iy, ix, v = nms(logits, frame.radius_to_working(radius_px), threshold=logit_floor)
    else:
        from .nms_torch import nms_torch

        iy, ix, v = nms_torch(logits, frame.radius_to_working(radius_px), threshold=logit_floor)
    x, y = frame.to_original(ix, iy)
    return Picks(name, x, y, sigmoid(v))
