"""Binary logistic regression on per-pixel features, fitted with L-BFGS and an analytic gradient.

The loss keeps the expected positive fraction near a prior ``pi`` (particles are rare), and
regularises towards a prior weight vector: zero (the published recipe) or Topaz's own linear head
(so a handful of labels refines the pretrained classifier instead of starting from nothing).
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass
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
    solver: str = "newton"  # 'newton': exact Hessian, to max|grad| < newton_tol; 'lbfgs': L-BFGS-B (max_iter, tol)
    newton_tol: float = 1e-10


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
        self.energy_: float | None = None  # with fit(laplace=True): the loss at the optimum, not divided by n
        self.log_det_hessian_: float | None = None  # ... and log det of its Hessian (the Laplace approximation)
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
        loss, grad, _ = self._loss_grad_aux(theta, X, y, weight, U, w0)
        return loss, grad

    def _loss_grad_aux(self, theta, X, y, weight, U, w0):
        """Loss, gradient, and the intermediate terms the Hessian reuses."""
        p = self.params
        w, b = theta[:-1], theta[-1]
        n = max(float(weight.sum()), 1.0)
        z = X @ w + b
        sig = _sigmoid(z)
        bce = -(y * _log_sigmoid(z) + (1.0 - y) * _log_sigmoid(-z))
        loss = float(np.dot(weight, bce))
        r = weight * (sig - y)
        gw = X.T @ r
        gb = float(r.sum())
        dw = w - w0
        loss += 0.5 * p.l2 * float(dw @ dw)
        gw = gw + p.l2 * dw
        aux = {"sig": sig}
        if p.pi_weight > 0 and U is not None and U.shape[0] > 0:
            pu = _sigmoid(U @ w + b)
            m = float(np.clip(pu.mean(), 1e-12, 1 - 1e-12))
            g = _logit(m) - _logit(p.pi)
            loss += p.pi_weight * g * g
            g1 = 1.0 / (m * (1.0 - m))
            s = pu * (1.0 - pu) / U.shape[0]
            gm = np.r_[U.T @ s, s.sum()]
            gw = gw + 2.0 * p.pi_weight * g * g1 * gm[:-1]
            gb += 2.0 * p.pi_weight * g * g1 * gm[-1]
            aux.update(pu=pu, m=m, g=g, g1=g1, s=s, gm=gm)
        return loss / n, np.r_[gw, gb] / n, aux

    @staticmethod
    def _gram(A32, c):
        """[A 1]^T diag(c) [A 1] in float32 (the Hessian only sets the step direction)."""
        d = A32.shape[1]
        Ac = A32 * c.astype(np.float32)[:, None]
        H = np.empty((d + 1, d + 1))
        H[:d, :d] = Ac.T @ A32
        H[:d, d] = H[d, :d] = Ac.sum(0, dtype=np.float64)
        H[d, d] = float(c.sum())
        return H

    def _hessian(self, weight, X32, U32, aux):
        """Exact Hessian of the loss: BCE + L2 + expectation term (its second-order terms included)."""
        p = self.params
        sig = aux["sig"]
        n = max(float(weight.sum()), 1.0)
        H = self._gram(X32, weight * sig * (1.0 - sig))
        d = X32.shape[1]
        H[np.arange(d), np.arange(d)] += p.l2
        if "pu" in aux:
            m, g, g1, pu, s, gm = aux["m"], aux["g"], aux["g1"], aux["pu"], aux["s"], aux["gm"]
            g2 = (2.0 * m - 1.0) / (m * (1.0 - m)) ** 2
            H += 2.0 * p.pi_weight * ((g1 * g1 + g * g2) * np.outer(gm, gm) + g * g1 * self._gram(U32, s * (1.0 - 2.0 * pu)))
        return H / n

    def _newton(self, theta, Xs, y, weight, Us, w0, max_steps: int = 50):
        """Newton's method with Levenberg damping and Armijo backtracking; returns (theta, steps, converged).

        Why: L-BFGS-B needs ~140 evaluations at 100 labels and stops ~1e-3 (in the weights) short
        of the optimum, a distance that changes with the BLAS thread count and so changes the
        proposals; Newton reaches max|grad| < newton_tol in 4-7 steps (4 from a warm start).
        """
        X32 = Xs.astype(np.float32)
        U32 = None if Us is None else Us.astype(np.float32)
        f, g, aux = self._loss_grad_aux(theta, Xs, y, weight, Us, w0)
        steps, d = 0, theta.size
        self._last_chol = None
        while steps < max_steps and np.abs(g).max() > self.params.newton_tol:
            H = self._hessian(weight, X32, U32, aux)
            lam = 0.0
            while True:
                try:
                    chol = np.linalg.cholesky(H + lam * np.eye(d))
                    break
                except np.linalg.LinAlgError:
                    lam = max(10.0 * lam, 1e-8 * float(np.abs(np.diag(H)).max()))
            step = -np.linalg.solve(chol.T, np.linalg.solve(chol, g))
            slope, t = float(g @ step), 1.0
            while True:
                f2, g2, aux2 = self._loss_grad_aux(theta + t * step, Xs, y, weight, Us, w0)
                if f2 <= f + 1e-4 * t * slope or t < 1e-8:
                    break
                # next to the optimum the loss changes below its rounding error (which moves with the
                # BLAS thread count): accept a step that shrinks the gradient without raising the loss
                if f2 - f <= 1e-12 * max(1.0, abs(f)) and np.abs(g2).max() < np.abs(g).max():
                    break
                t *= 0.5
            if t < 1e-8:
                break
            theta, f, g, aux = theta + t * step, f2, g2, aux2
            steps += 1
            # the last factor, one converged step (|step| ~ |grad|) short of the optimum: its log det is
            # the optimum's to ~1e-8, so the Laplace terms need no extra Hessian (evidence.py)
            self._last_chol = chol if lam == 0.0 else None
        return theta, steps, bool(np.abs(g).max() <= 100 * self.params.newton_tol)

    def _laplace(self, theta, Xs, y, weight, Us, w0, reuse: bool) -> tuple[float, float]:
        """(loss, log det of its Hessian) at ``theta``, both NOT divided by n: the Laplace approximation's terms.

        The expectation term counts as part of the likelihood (it is in the loss and in the Hessian).
        """
        n = max(float(weight.sum()), 1.0)
        f, _, aux = self._loss_grad_aux(theta, Xs, y, weight, Us, w0)
        chol = self._last_chol if reuse else None
        if chol is None:
            H = self._hessian(weight, Xs.astype(np.float32), None if Us is None else Us.astype(np.float32), aux)
            try:
                chol = np.linalg.cholesky(H)
            except np.linalg.LinAlgError:  # not a strict minimum (a flat direction): clip, do not fail
                ev = np.linalg.eigvalsh(H)
                return f * n, float(np.sum(np.log(np.maximum(ev, 1e-12 * ev.max())))) + theta.size * np.log(n)
        return f * n, 2.0 * float(np.sum(np.log(np.diag(chol)))) + theta.size * np.log(n)

    def fit(self, X, y, weight=None, unlabelled=None, prior=None, warm_start: bool = False,
            laplace: bool = False) -> "BLR":
        """Fit on labelled feature rows ``X`` (n, d) with targets ``y`` in [0, 1].

        ``unlabelled``: feature rows for the expectation term; ``prior``: (w0, b0) in raw space,
        default zeros.  With ``warm_start`` the current weights are the starting point.  With
        ``laplace``, ``energy_`` and ``log_det_hessian_`` are set (the evidence's terms).
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
        theta, self.n_iter_, done = start, 0, False
        self._last_chol = None
        if self.params.solver == "newton":
            theta, self.n_iter_, done = self._newton(start, Xs, y, weight, Us, w0)
        elif self.params.solver != "lbfgs":
            raise ValueError(f"unknown solver {self.params.solver!r}; choose newton or lbfgs")
        if not done:  # L-BFGS-B, or to finish a Newton run that stalled
            res = minimize(self.loss_and_grad, theta, args=(Xs, y, weight, Us, w0, b0), jac=True,
                           method="L-BFGS-B", options={"maxiter": self.params.max_iter, "gtol": self.params.tol})
            theta, self.n_iter_ = res.x, self.n_iter_ + int(res.nit)
        if laplace:
            self.energy_, self.log_det_hessian_ = self._laplace(theta, Xs, y, weight, Us, w0, reuse=done)
        ws, bs = theta[:-1], float(theta[-1])
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
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path}: damaged model description ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{meta_path}: not a cryoal_ext BLR model (format {got!r})")
        params = meta.pop("params", None)
        meta.pop("format")
        if not isinstance(params, dict):
            raise ValueError(f"{meta_path}: no hyper-parameters ('params') in the model description")
        try:
            model = cls(**params)
        except TypeError as e:
            raise ValueError(f"{meta_path}: unknown hyper-parameters ({e})") from None
        try:
            with np.load(path, allow_pickle=False) as z:
                model.coef_ = z["coef"].astype(np.float64)
                model.intercept_ = float(z["intercept"][0])
                model.prior_coef_ = z["prior_coef"].astype(np.float64)
                model.prior_intercept_ = float(z["prior_intercept"][0])
        except KeyError as e:
            raise ValueError(f"{path}: damaged model weights (missing {e})") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: damaged model weights ({type(e).__name__}: {e})") from None
        model.meta = meta
        return model
