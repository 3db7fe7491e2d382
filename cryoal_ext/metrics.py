"""Average precision of picks against ground truth, matched one-to-one within the particle radius."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree


def match(px, py, tx, ty, radius: float) -> np.ndarray:
    """Boolean per prediction: matched to a distinct true particle within ``radius`` (Hungarian on distance)."""
    px, py, tx, ty = (np.asarray(a, dtype=float) for a in (px, py, tx, ty))
    hit = np.zeros(px.size, dtype=bool)
    if px.size == 0 or tx.size == 0:
        return hit
    neighbours = cKDTree(np.c_[tx, ty]).query_ball_point(np.c_[px, py], radius)
    rows = np.repeat(np.arange(px.size), [len(n) for n in neighbours])
    if rows.size == 0:
        return hit
    cols = np.fromiter((j for n in neighbours for j in n), dtype=np.int64, count=rows.size)
    dist = np.hypot(px[rows] - tx[cols], py[rows] - ty[cols])
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    infeasible = (radius + 1.0) * (min(ur.size, uc.size) + 1)  # any feasible matching beats one more infeasible pair
    cost = np.full((ur.size, uc.size), infeasible)
    cost[ri, ci] = dist
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] <= radius
    hit[ur[r[ok]]] = True
    return hit


@dataclass
class Evaluation:
    ap: float
    ap90: float
    recall: float  # at the lowest score reported
    n_true: int
    n_pred: int
    scores: np.ndarray  # pooled prediction scores, sorted descending
    tp: np.ndarray  # matched flags in the same order

    def curve(self):
        """(recall, precision) along the pooled ranking."""
        ctp = np.cumsum(self.tp)
        precision = ctp / np.arange(1, self.tp.size + 1)
        recall = ctp / max(self.n_true, 1)
        return recall, precision

    def counts_at(self, threshold: float) -> dict:
        keep = self.scores >= threshold
        tp = int(self.tp[keep].sum())
        fp = int(keep.sum() - tp)
        return {"threshold": threshold, "tp": tp, "fp": fp, "fn": self.n_true - tp,
                "precision": tp / max(tp + fp, 1), "recall": tp / max(self.n_true, 1)}

    def to_dict(self) -> dict:
        return {"ap": round(self.ap, 4), "ap90": round(self.ap90, 4), "recall": round(self.recall, 4),
                "n_true": self.n_true, "n_pred": self.n_pred}


def average_precision(scores: np.ndarray, tp: np.ndarray, n_true: int, max_recall: float = 1.0) -> float:
    """Sum of precision x delta-recall over the ranking, up to ``max_recall``, divided by it."""
    order = np.argsort(-scores, kind="stable")
    tp = np.asarray(tp, dtype=float)[order]
    if n_true == 0 or tp.size == 0:
        return 0.0
    ctp = np.cumsum(tp)
    precision = ctp / np.arange(1, tp.size + 1)
    recall = ctp / n_true
    delta = np.diff(np.r_[0.0, recall])
    keep = recall <= max_recall + 1e-12
    return float(np.sum(precision[keep] * delta[keep]) / max_recall)


def evaluate(predictions: dict, truth: dict, radius: float, shapes: dict | None = None, border: float = 0.0) -> Evaluation:
    """Pool picks of several micrographs and score them against the truth.

    ``predictions``: name -> (x, y, score); ``truth``: name -> (x, y); all in original pixels.
    Micrographs evaluated are the keys of ``predictions``; with ``border`` > 0, both truth and
    predictions within ``border`` px of an edge (``shapes``: name -> (ny, nx)) are left out.
    """
    from .coords import inside_border

    all_scores, all_tp, n_true = [], [], 0
    for name, (x, y, s) in predictions.items():
        x, y, s = np.asarray(x, float), np.asarray(y, float), np.asarray(s, float)
        tx, ty = truth.get(name, (np.empty(0), np.empty(0)))
        tx, ty = np.asarray(tx, float), np.asarray(ty, float)
        if border > 0:
            if shapes is None or name not in shapes:
                raise ValueError(f"border given but no image shape for micrograph {name}")
            kp = inside_border(x, y, shapes[name], border)
            kt = inside_border(tx, ty, shapes[name], border)
            x, y, s, tx, ty = x[kp], y[kp], s[kp], tx[kt], ty[kt]
        all_scores.append(s)
        all_tp.append(match(x, y, tx, ty, radius))
        n_true += tx.size
    scores = np.concatenate(all_scores) if all_scores else np.empty(0)
    tp = np.concatenate(all_tp) if all_tp else np.empty(0, bool)
    order = np.argsort(-scores, kind="stable")
    scores, tp = scores[order], tp[order]
    ap = average_precision(scores, tp, n_true)
    ap90 = average_precision(scores, tp, n_true, max_recall=0.9)
    recall = float(tp.sum() / n_true) if n_true else 0.0
    return Evaluation(ap, ap90, recall, n_true, int(scores.size), scores, tp)
