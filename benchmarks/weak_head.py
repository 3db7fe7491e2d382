"""A stand-in for a protein where Topaz's pretrained head is weak: the same features, a head turned away.

Why: issue 16's new proteins (pretrained AP 0.40-0.44, where the prior towards Topaz's head holds
the model back) are not shared, and the particle-size stand-in (accuracy.py '10028/2') leaves the
head strong.  Here the head's weight vector is rotated by an angle towards a fixed random direction
orthogonal to it (same norm; the bias moved so the mean logit over the micrographs stays where it
was), the angle chosen by bisection so the rotated head's AP over all the dataset's micrographs is
the target.  The baseline score, the pseudo-labels, the round-0 proposals and the prior centre w0
all come from the rotated head, as they would from a head that is wrong on a new protein.

What it does not imitate: the features stay those of a protein the backbone knows, so the linear
ceiling stays high (a new protein's is 0.70-0.73); the head is wrong in a random direction, not
in a way a real one would be (picking ice, aggregates, empty micelles).  A lower bound on what
the prior costs, not a new protein.
"""
from __future__ import annotations

import numpy as np

import cryoal_ext.learner as LRN
from cryoal_ext.benchmark import _evaluate
from cryoal_ext.extract import extract_picks
from cryoal_ext.features import FeatureMap, head_of
from cryoal_ext.learner import Item
from cryoal_ext.model import BLR

SEED = 16  # the random direction's seed: one fixed stand-in, not a search over directions


def head_model(w: np.ndarray, b: float) -> BLR:
    """A BLR holding the turned head, so its maps come from the package's own chunked ``logit_map``."""
    m = BLR()
    m.coef_, m.intercept_ = np.asarray(w, dtype=np.float64), float(b)
    return m


def rotated(w0: np.ndarray, b0: float, theta: float, mean_feature: np.ndarray) -> tuple[np.ndarray, float]:
    """w0 turned by ``theta`` (radians) towards the fixed orthogonal direction; the bias keeps the mean logit."""
    r = np.random.default_rng(SEED).standard_normal(w0.size)
    r -= (r @ w0) / (w0 @ w0) * w0
    r *= np.linalg.norm(w0) / np.linalg.norm(r)
    w = np.cos(theta) * w0 + np.sin(theta) * r
    return w, float(b0 + (w0 - w) @ mean_feature)


def weaken(data: dict, settings, feature_model: str, target_ap: float, steps: int = 12) -> dict:
    """``data`` (benchmark.load_data) with the head rotated until its AP over every micrograph is ``target_ap``.

    Returns the new data with the turned head (``head``, for ``use``) and a ``weak_head`` record
    (angle, AP, the original AP).  A ``head`` already in ``data`` (weak_features.add_noise) is the one turned.
    """
    w0, b0 = data["head"] if "head" in data else head_of(feature_model)
    items = data["items"]
    mean_feature = np.mean([np.asarray(it.fmap.features, dtype=np.float32).mean(axis=(1, 2)) for it in items.values()],
                           axis=0).astype(np.float64)

    def ap_at(theta: float):
        w, b = rotated(w0, b0, theta, mean_feature)
        head = head_model(w, b)
        maps = {n: head.logit_map(it.fmap.features) for n, it in items.items()}
        picks = [extract_picks(n, maps[n], it.mic.frame, settings.radius_px) for n, it in items.items()]
        return _evaluate(picks, data["truth"], settings, data["shapes"]).ap, w, b, maps

    original = ap_at(0.0)[0]
    lo, hi = 0.0, np.pi / 2  # assumes AP falls as the head turns away; the record keeps the AP reached
    best = None
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        got = ap_at(mid)
        if best is None or abs(got[0] - target_ap) < abs(best[1][0] - target_ap):
            best = (mid, got)
        lo, hi = (mid, hi) if got[0] > target_ap else (lo, mid)
    theta, (ap, w, b, maps) = best
    new_items = {n: Item(it.mic, FeatureMap(it.fmap.features, maps[n])) for n, it in items.items()}
    return dict(data, items=new_items, head=(w, b),
                weak_head={"target_ap": target_ap, "ap_all": round(float(ap), 4), "original_ap_all": round(float(original), 4),
                           "theta_deg": round(float(np.degrees(theta)), 2), "direction_seed": SEED})


def use(data: dict) -> None:
    """The learner's prior centre (``head_of``) for runs on ``data``: its turned head, or Topaz's own."""
    LRN.head_of = (lambda name, head=data["head"]: head) if "head" in data else head_of
