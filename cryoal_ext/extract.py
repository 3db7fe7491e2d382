"""Picking: greedy non-maximum suppression on a score map, and conversion back to file pixels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .coords import Frame


def _disc(radius: float) -> tuple[np.ndarray, np.ndarray]:
    r = int(np.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = xx * xx + yy * yy <= radius * radius
    return yy[keep], xx[keep]


def nms(score: np.ndarray, radius: float, threshold: float | None = None, max_picks: int | None = None):
    """Greedy NMS: repeatedly take the best remaining pixel and suppress a disc of ``radius`` around it.

    Exact (same answer as the brute-force loop) but walks the sorted pixels in vectorised chunks.
    Returns (iy, ix, values) in descending score order.  Ties break by raster order.
    """
    ny, nx = score.shape
    flat = score.ravel()
    order = np.argsort(-flat, kind="stable")
    if threshold is not None:
        order = order[flat[order] >= threshold]
    dy, dx = _disc(max(radius, 0.0))
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
    min_score: float = 1e-4,
) -> Picks:
    """NMS on a working-scale logit map with the particle radius; scores become probabilities.

    ``radius_px`` is in original pixels; ``threshold`` is a probability.  ``min_score`` drops the
    hopeless tail so files stay small (it is far below any threshold a user would choose).
    """
    floor = max(threshold or 0.0, min_score)
    logit_floor = float(np.log(floor / (1.0 - floor))) if 0 < floor < 1 else None
    iy, ix, v = nms(logits, frame.radius_to_working(radius_px), threshold=logit_floor)
    x, y = frame.to_original(ix, iy)
    return Picks(name, x, y, sigmoid(v))
