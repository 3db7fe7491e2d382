"""Binary logistic regression on per-pixel features, fitted with L-BFGS and an analytic gradient.

The loss keeps the expected positive fraction near a prior ``pi`` (particles are rare), and
regularises towards a prior weight vector: zero (the published recipe) or Topaz's own linear head
(so a handful of labels refines the pretrained classifier instead of starting from nothing).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from .atomic import atomic_path, write_json

FORMAT = "cryoal_ext.blr/1"


def _log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def _sigmoid(z):
    return np.exp(_log_sigmoid(z))


def _logit(p):
    return np.log(p) - np.log1p(-p)


@dataclass
class BLRParams:
    """Hyper-parameters of the BLR (everything get_params returns)."""

    l2: float = 1.0  # strength of the L2 pull of w towards w0
    pi: float = 0.01  # prior fraction of positive pixels
    pi_weight: float = 1.0  # strength of the expectation term
    max_iter: int = 200
    tol: float = 1e-6
    standardise: bool = False  # per-feature z-scoring learned from the unlabelled pixels


class BLR:
    """Estimator-style logistic regression: fit / decision_function / predict_proba / get_params."""

    def __init__(self, **params):
        self.params = BLRParams(**params)
        self.coef_: np.ndarray | None = None  # in raw feature space
        self.intercept_: float = 0.0
        self.prior_coef_: np.ndarray | None = None
        self.prior_intercept_: float = 0.0
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.n_iter_: int = 0
        self.meta: dict = {}

    # --- scikit-learn style parameter access -------------------------------------------------
    def get_params(self, deep: bool = True) -> dict:
        return asdict(self.params)

    def set_params(self, **params) -> "BLR":
        self.params = BLRParams(**{**asdict(self.params), **params})
        return self

    # --- the loss ------------------------------------------------------------------------------
    def loss_and_grad(self, theta, X, y, weight, U, w0, b0):
        """Loss and gradient w.r.t. theta = [w, b] (standardised space). Public for the gradient test."""
        p = self.params
        w, b = theta[:-1], theta[-1]
        n = max(float(weight.sum()), 1.0)
        z = X @ w + b
        bce = -(y * _log_sigmoid(z) + (1.0 - y) * _log_sigmoid(-z))
        loss = float(np.dot(weight, bce))
        r = weight * (_sigmoid(z) - y)
        gw = X.T @ r
        gb = float(r.sum())
        dw = w - w0
        loss += 0.5 * p.l2 * float(dw @ dw)
        gw = gw + p.l2 * dw
        if p.pi_weight > 0 and U is not None and U.shape[0] > 0:
            zu = U @ w + b
            pu = _sigmoid(zu)
            m = float(np.clip(pu.mean(), 1e-12, 1 - 1e-12))
            g = _logit(m) - _logit(p.pi)
            loss += p.pi_weight * g * g
            dm = 2.0 * p.pi_weight * g / (m * (1.0 - m))
            s = pu * (1.0 - pu) / U.shape[0]
            gw = gw + dm * (U.T @ s)
            gb += dm * float(s.sum())
        return loss / n, np.r_[gw, gb] / n

    def fit(self, X, y, weight=None, unlabelled=None, prior=None, warm_start: bool = False) -> "BLR":
        """Fit on labelled feature rows ``X`` (n, d) with targets ``y`` in [0, 1].

        ``unlabelled``: feature rows for the expectation term; ``prior``: (w0, b0) in raw space,
        default zeros.  With ``warm_start`` the current weights are the starting point.
        """
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        weight = np.ones_like(y) if weight is None else np.asarray(weight, dtype=np.float64)
        U = None if unlabelled is None else np.asarray(unlabelled, dtype=np.float64)
        d = X.shape[1]
        if self.params.standardise:
            ref = U if U is not None and U.shape[0] > 1 else X
            self.mean_ = ref.mean(axis=0)
            self.scale_ = ref.std(axis=0) + 1e-6
        else:
            self.mean_, self.scale_ = np.zeros(d), np.ones(d)
        Xs = (X - self.mean_) / self.scale_
        Us = None if U is None else (U - self.mean_) / self.scale_
        w0_raw, b0_raw = (np.zeros(d), 0.0) if prior is None else (np.asarray(prior[0], float), float(prior[1]))
        self.prior_coef_, self.prior_intercept_ = w0_raw, b0_raw
        w0, b0 = self._to_std(w0_raw, b0_raw)
        if warm_start and self.coef_ is not None and self.coef_.shape[0] == d:
            start = np.r_[self._to_std(self.coef_, self.intercept_)]
        else:
            start = np.r_[w0, b0]
        res = minimize(self.loss_and_grad, start, args=(Xs, y, weight, Us, w0, b0), jac=True,
                       method="L-BFGS-B", options={"maxiter": self.params.max_iter, "gtol": self.params.tol})
        self.n_iter_ = int(res.nit)
        ws, bs = res.x[:-1], float(res.x[-1])
        self.coef_ = ws / self.scale_
        self.intercept_ = bs - float(np.dot(self.coef_, self.mean_))
        return self

    def _to_std(self, w, b):
        """Raw-space (w, b) -> the same function in standardised space."""
        ws = np.asarray(w, float) * self.scale_
        return ws, float(b + np.dot(w, self.mean_))

    # --- prediction ----------------------------------------------------------------------------
    def _check(self):
        if self.coef_ is None:
            raise RuntimeError("BLR is not fitted")

    def decision_function(self, X) -> np.ndarray:
        self._check()
        return np.asarray(X, dtype=np.float32) @ self.coef_.astype(np.float32) + np.float32(self.intercept_)

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities of the positive class, shape (n,)."""
        return _sigmoid(self.decision_function(X).astype(np.float64))

    def logit_map(self, features: np.ndarray, rows_per_chunk: int = 64) -> np.ndarray:
        """Logits over a (C, H, W) feature map (float16 or memory-mapped), chunked to bound memory."""
        self._check()
        c, h, wdt = features.shape
        w = self.coef_.astype(np.float32)
        out = np.empty((h, wdt), dtype=np.float32)
        for r in range(0, h, rows_per_chunk):
            block = np.asarray(features[:, r : r + rows_per_chunk], dtype=np.float32)
            out[r : r + rows_per_chunk] = np.tensordot(w, block, axes=(0, 0)) + np.float32(self.intercept_)
        return out

    # --- persistence: npz + json, never pickle -------------------------------------------------
    def save(self, path: str | os.PathLike, **meta) -> Path:
        """Write ``path`` (.npz weights) and ``path`` with .json (hyper-parameters, feature model, scale)."""
        self._check()
        path = Path(path).with_suffix(".npz")
        self.meta.update(meta)
        with atomic_path(path) as tmp:
            np.savez(tmp, coef=self.coef_, intercept=np.array([self.intercept_]),
                     prior_coef=self.prior_coef_ if self.prior_coef_ is not None else np.zeros_like(self.coef_),
                     prior_intercept=np.array([self.prior_intercept_]))
        write_json(path.with_suffix(".json"), {"format": FORMAT, "params": self.get_params(), **self.meta})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BLR":
        path = Path(path).with_suffix(".npz")
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"model not found: need both {path} and {meta_path}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a cryoal_ext BLR model (format {meta.get('format')!r})")
        params = meta.pop("params")
        meta.pop("format")
        model = cls(**params)
        with np.load(path, allow_pickle=False) as z:
            model.coef_ = z["coef"].astype(np.float64)
            model.intercept_ = float(z["intercept"][0])
            model.prior_coef_ = z["prior_coef"].astype(np.float64)
            model.prior_intercept_ = float(z["prior_intercept"][0])
        model.meta = meta
        return model
