"""Choosing what to label next: entropy peaks, spread out, never a spot already labelled."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .extract import nms, sigmoid


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
