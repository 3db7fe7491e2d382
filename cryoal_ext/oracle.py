"""A simulated user who answers proposals from the ground truth (for benchmarks and tests)."""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .acquisition import Proposal
from .labels import Label


class Oracle:
    """``careful``: within R of a particle -> a positive at that particle's centre (a user re-centres
    the pick), else a negative at the proposal.  ``literal`` (the published benchmark): the proposal
    itself is positive iff within R of a particle."""

    def __init__(self, truth: dict, radius_px: float, mode: str = "careful"):
        if mode not in ("careful", "literal"):
            raise ValueError(f"unknown oracle {mode!r}; choose careful or literal")
        self.mode = mode
        self.radius = float(radius_px)
        self.trees = {n: (cKDTree(np.c_[x, y]) if len(x) else None, np.c_[x, y]) for n, (x, y) in truth.items()}

    def answer(self, proposals: list[Proposal], round_: int = 0) -> list[Label]:
        out = []
        for p in proposals:
            tree, pts = self.trees.get(p.micrograph, (None, None))
            d, j = (tree.query([p.x, p.y]) if tree is not None else (np.inf, -1))
            hit = d <= self.radius
            if hit and self.mode == "careful":
                out.append(Label(p.micrograph, float(pts[j, 0]), float(pts[j, 1]), 1, "oracle", round_))
            else:
                out.append(Label(p.micrograph, p.x, p.y, int(hit), "oracle", round_))
        return out
