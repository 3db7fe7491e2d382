"""The active-learning engine: labels + cached features -> BLR -> proposals and picks.

Front ends (CLI, benchmark, RELION, cryoSPARC) all drive this one class.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .calibration import calibrated
from .acquisition import Proposal, entropy, entropy_peaks, peaks, spread_in_features
from . import evidence, strength_cv
from .extract import Picks, extract_picks, sigmoid
from .features import DEFAULT_FEATURE_MODEL, FeatureMap, blas_threads, head_of
from .io import Micrograph
from .labels import Label
from .model import BLR
from .recipes import Recipe


IN_MEMORY_LIMIT = 4 << 30  # bytes of float32 training features kept in RAM; above it, memory-mapped float16


@dataclass
class Item:
    mic: Micrograph
    fmap: FeatureMap


def _offsets(recipe: Recipe, radius_w: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) covered by one label at the working scale."""
    if recipe.label_shape == "square":
        h = int(recipe.label_size) // 2
        yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
        return yy.ravel(), xx.ravel()
    rad = max(recipe.label_size * radius_w, 0.5)
    r = int(np.ceil(rad))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = xx * xx + yy * yy <= rad * rad
    return yy[keep], xx[keep]


def _best_first(cands: dict) -> list:
    """``_candidates``' per-micrograph lists pooled into one, highest value first (stable on ties)."""
    return sorted(((n, c) for n, cs in cands.items() for c in cs), key=lambda t: -t[1][0])


class ActiveLearner:
    """Holds the training micrographs' features; fits the BLR to labels; proposes what to label next."""

    # What makes a round fast (benchmarks/round_latency.py switches each off for its ablation):
    solver = "newton"  # BLR solver: 'newton' (exact Hessian, converged) or 'lbfgs'
    warm_start = True  # start each fit from the last one (same optimum, fewer steps)
    top_k = True  # compute only the k best peaks a batch can use (exactly the full NMS's first k)
    EVIDENCE_TOL = 1e-6  # max|grad| of the fits that only score a prior strength (evidence.climb)

    def __init__(self, items: list[Item], radius_px: float, recipe: Recipe, feature_model: str = DEFAULT_FEATURE_MODEL,
                 seed: int = 0, in_memory: bool | None = None, audit_items: list[Item] = ()):
        if not items:
            raise ValueError("no training micrographs")
        if recipe.audits_apart and not audit_items:
            raise ValueError(f"recipe {recipe.name!r} asks {recipe.audits} audits a round about the picks of a "
                             "micrograph it never trains on, and none was given: it needs one micrograph more than "
                             "the training ones (audits run in `cryoal round` and `cryoal benchmark`; the RELION, cryoSPARC and napari front ends do not offer them yet)")
        clash = {it.mic.name for it in items} & {it.mic.name for it in audit_items}
        if clash:
            raise ValueError(f"micrograph(s) {', '.join(sorted(clash))} both trained on and audited: an audit "
                             "micrograph is one the model never trains on")
        if in_memory is None:
            in_memory = sum(it.fmap.nbytes_float32 for it in items) <= IN_MEMORY_LIMIT
        if in_memory:
            # float32 copies in RAM: every round reads all training pixels (logits) and gathers label rows
            items = [Item(it.mic, it.fmap.in_memory()) for it in items]
        self.items = {it.mic.name: it for it in items}
        # micrographs never trained on: the recipe's audits ask about their picks (calibration.py)
        self.audit_items = {it.mic.name: it for it in audit_items}
        self.radius_px = float(radius_px)
        self.recipe = recipe
        self.feature_model = feature_model
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.model: BLR | None = None
        self._logits: dict[str, np.ndarray] = {}
        self.last_fit_s = 0.0
        self._unlabelled = self._sample_unlabelled()
        self._pi: float | None = None
        self._pseudo = self._pseudo_labels()
        self.strength = 1.0  # the prior's strength factor (recipe prior_strength 'evidence' or 'cv'; 1: as the recipe says)
        self._prior_min: tuple[tuple, BLR] | None = None  # cache of the prior-only fit (evidence.py's θ_P)

    @property
    def feature_dim(self) -> int:
        """Channels of the feature maps (the BLR's weight count)."""
        return next(iter(self.items.values())).fmap.features.shape[0]

    # --- geometry helpers ----------------------------------------------------------------------
    def radius_w(self, name: str) -> float:
        return self.items[name].mic.frame.radius_to_working(self.radius_px)

    def _label_index(self, labels: list[Label]):
        """Per micrograph: working-scale pixel indices of labelled spots, for exclusion."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in self.items:
            sel = [l for l in labels if l.micrograph == name]
            if sel:
                ix, iy = self.items[name].mic.frame.to_working_index([l.x for l in sel], [l.y for l in sel])
                out[name] = (iy, ix)
        return out

    # --- training data -------------------------------------------------------------------------
    def _sample_unlabelled(self) -> np.ndarray | None:
        r = self.recipe
        if r.pi_weight <= 0:
            return None
        rows = []
        total = sum(int(np.prod(it.fmap.shape)) for it in self.items.values())
        for it in self.items.values():
            ny, nx = it.fmap.shape
            if r.unlabelled_sample and r.unlabelled_sample < total:
                k = max(1, int(round(r.unlabelled_sample * ny * nx / total)))
                flat = np.sort(self.rng.choice(ny * nx, size=k, replace=False))
                iy, ix = np.divmod(flat, nx)
                rows.append(it.fmap.at(iy, ix))
            else:
                rows.append(np.asarray(it.fmap.features, dtype=np.float32).reshape(it.fmap.features.shape[0], -1).T)
        return np.concatenate(rows)

    def _pseudo_labels(self) -> list[Label]:
        """Top-N / bottom-N peaks of the pretrained score, pooled over the training micrographs."""
        n = self.recipe.pseudo_labels
        if self.recipe.pseudo_area_px > 0:
            # a fixed N on a small training area reaches past the real particles into junk (3 crops of
            # 343x343: AP 0.69 with N=100 vs 0.85 with none), so N is per area, never above the recipe's
            area = sum(int(np.prod(it.fmap.shape)) for it in self.items.values())
            n = min(n, int(round(n * area / self.recipe.pseudo_area_px)))
        if n <= 0:
            return []
        cands = []
        for name, it in self.items.items():
            iy, ix, v = peaks(it.fmap.score, self.radius_w(name))
            x, y = it.mic.frame.to_original(ix, iy)
            cands += [(float(s), name, float(a), float(b)) for s, a, b in zip(v, x, y)]
        cands.sort(key=lambda c: -c[0])
        top, bottom = cands[:n], cands[-n:] if len(cands) > n else []
        # soft targets: the pretrained head's belief at its own extreme peaks, so a top-N that runs past
        # the real particles (few or small micrographs) does not teach junk as positives
        self._pseudo_target = {(m, x, y): float(sigmoid(s)) for s, m, x, y in top + bottom}
        return ([Label(m, x, y, 1, "pseudo") for _, m, x, y in top]
                + [Label(m, x, y, 0, "pseudo") for _, m, x, y in bottom])

    def training_set(self, labels: list[Label]):
        """Feature rows, targets and weights for real labels plus (decayed) pseudo-labels."""
        real, pseudo = self.training_parts(labels)
        return tuple(np.concatenate([a, b]) for a, b in zip(real, pseudo))

    def training_parts(self, labels: list[Label]):
        """(X, y, w) of the real labels and (X, y, w) of the pseudo-labels, apart (the evidence treats them apart)."""
        d = self.feature_dim
        parts = []
        for blocks in self.training_pixels(labels):
            X = [self.items[name].fmap.at(iy, ix) for name, iy, ix, _, _ in blocks]
            parts.append((np.concatenate(X), np.concatenate([b[3] for b in blocks]), np.concatenate([b[4] for b in blocks]))
                         if blocks else (np.empty((0, d), np.float32), np.empty(0), np.empty(0)))
        return parts[0], parts[1]

    def training_pixels(self, labels: list[Label]):
        """The pixels a fit trains on: blocks (micrograph, iy, ix, target, weight) of the real labels and of the pseudo-labels.

        Why apart from the features: a model on other features of the same pixels (a fine-tuned
        backbone, benchmarks/finetune_last_block.py) trains on exactly what the BLR trains on.
        """
        r = self.recipe
        real = [l for l in labels if l.micrograph in self.items]
        pseudo = list(self._pseudo)
        if pseudo and real:
            idx = self._label_index(real)
            keep = []
            for p in pseudo:
                if p.micrograph not in idx:
                    keep.append(p)
                    continue
                fx, fy = self.items[p.micrograph].mic.frame.to_working(p.x, p.y)
                iy, ix = idx[p.micrograph]
                if np.min((iy - fy) ** 2 + (ix - fx) ** 2) > self.radius_w(p.micrograph) ** 2:
                    keep.append(p)
            pseudo = keep
        pw = r.pseudo_weight / (1.0 + r.pseudo_decay * len(real))
        parts = []
        for group, weight in ((real, 1.0), (pseudo, pw)):
            blocks = []
            for name in {l.micrograph for l in group}:
                it = self.items[name]
                sel = [l for l in group if l.micrograph == name]
                dy, dx = _offsets(r, self.radius_w(name))
                ix, iy = it.mic.frame.to_working_index([l.x for l in sel], [l.y for l in sel])
                ny, nx = it.fmap.shape
                Y = np.clip(iy[:, None] + dy[None], 0, ny - 1).ravel()
                Xc = np.clip(ix[:, None] + dx[None], 0, nx - 1).ravel()
                if group is pseudo and r.pseudo_target == "soft":
                    t = [self._pseudo_target[(l.micrograph, l.x, l.y)] for l in sel]
                else:
                    t = [float(l.label) for l in sel]
                per_pixel = weight / dy.size if r.label_weight == "label" else weight
                blocks.append((name, Y, Xc, np.repeat(t, dy.size), np.full(Y.size, per_pixel)))
            parts.append(blocks)
        return parts[0], parts[1]

    # --- fitting and prediction ----------------------------------------------------------------
    def prior(self):
        if self.recipe.prior == "pretrained":
            return head_of(self.feature_model)
        return None

    def pi(self) -> float:
        """Prior positive fraction: the recipe's constant, or what the pretrained head expects on these micrographs.

        Why the latter: a constant pi that disagrees with the pretrained head drags the bias away from
        the prior before labels can say anything (the seed's pi=0.01 assumes a particle density).
        """
        r = self.recipe
        if r.pi_source == "constant" or self._unlabelled is None:
            return r.pi
        if r.pi_source != "pretrained":
            raise ValueError(f"unknown pi_source {r.pi_source!r}; choose constant or pretrained")
        if self._pi is None:
            w0, b0 = head_of(self.feature_model)
            p = sigmoid(self._unlabelled.astype(np.float64) @ w0 + b0)
            self._pi = float(np.clip(p.mean(), 1e-4, 0.5))
        return self._pi

    def fit(self, labels: list[Label], start: BLR | None = None) -> BLR:
        """Fit on ``labels``; Newton starts from ``start`` or the last fit (same optimum, fewer steps).

        With the recipe's ``prior_strength='evidence'`` the prior's strength is chosen here (from the
        strength ``start`` or the last fit had), and later ``fit_model`` refits keep it.
        """
        t = time.perf_counter()
        start = start if start is not None else self.model
        if self.recipe.prior_strength != "fixed" and any(l.micrograph in self.items for l in labels):
            choice = self._choose_strength(labels, start)
            model, self.strength = choice.model, choice.strength
            key = "log_evidence" if self.recipe.prior_strength == "evidence" else "cv_loglik"
            model.meta.update(prior_strength=choice.strength, **{key: {str(k): v for k, v in choice.scores.items()}})
        else:
            model = self.fit_model(labels, start)
        self.model = model
        self._logits = {}
        self.last_fit_s = time.perf_counter() - t
        return model

    def _choose_strength(self, labels: list[Label], start: BLR | None) -> "evidence.Choice":
        """The prior strength the answers prefer (their evidence, evidence.py, or held-out likelihood, strength_cv.py)."""
        real, pseudo = self.training_parts(labels)
        begin = float(start.meta.get("prior_strength", self.strength)) if start is not None else self.strength
        laplace = self.recipe.prior_strength == "evidence"

        def fit_at(s: float, warm: BLR | None, final: bool) -> BLR:
            return self._fit_parts(real, pseudo, len(labels), s, warm if warm is not None else start,
                                   newton_tol=None if final else self.EVIDENCE_TOL, laplace=laplace and not final)

        if laplace:
            prior_min, dim = self._prior_minimum(pseudo, len(labels))
            return evidence.choose(fit_at, prior_min, dim, start=begin)
        return evidence.climb(fit_at, lambda s, m: strength_cv.held_out_loglik(self, labels, s, m), start=begin)

    def _prior_minimum(self, pseudo, n_labels: int) -> tuple[float, int]:
        """min over θ of the prior's energy P (l2 pull + pseudo-labels; it does not move with the strength), its dimension."""
        X, y, w = pseudo
        d = self.feature_dim
        if X.shape[0] == 0 or w.sum() <= 0:
            return 0.0, d  # P = l2/2 |w - w0|², minimum 0 at w0; the bias is flat and cancels
        key = (X.shape[0], float(w.sum()), float(y.sum()), n_labels if self.recipe.l2_decay else 0)
        if self._prior_min is None or self._prior_min[0] != key:
            l2 = self.recipe.l2 / (1.0 + self.recipe.l2_decay * n_labels)
            m = BLR(l2=l2, pi_weight=0.0, standardise=self.recipe.standardise)
            warm = self._prior_min[1] if self._prior_min is not None else None
            if warm is not None:
                m.coef_, m.intercept_ = warm.coef_, warm.intercept_
            with blas_threads(1):
                m.fit(X, y, w, unlabelled=self._unlabelled, prior=self.prior(), warm_start=warm is not None, laplace=True)
            self._prior_min = (key, m)
        return float(self._prior_min[1].energy_), d + 1

    def fit_model(self, labels: list[Label], start: BLR | None = None, newton_tol: float | None = None,
                  strength: float | None = None) -> BLR:
        """The BLR fitted on ``labels``, leaving the learner's own model alone (cross-validation refits).

        ``newton_tol``: a looser stop than the BLR's default, for refits that only score a few answers.
        The prior's strength is ``strength``, else the learner's current one (1 unless the evidence or
        the cross-validation chose another).
        """
        real, pseudo = self.training_parts(labels)
        if strength is None:
            strength = self.strength if self.recipe.prior_strength != "fixed" else 1.0
        return self._fit_parts(real, pseudo, len(labels), strength, start, newton_tol=newton_tol)

    def _fit_parts(self, real, pseudo, n_labels: int, strength: float, start: BLR | None,
                   newton_tol: float | None = None, laplace: bool = False) -> BLR:
        """One BLR fit: the prior (l2 and the pseudo-labels' weight) scaled by ``strength``."""
        r = self.recipe
        X = np.concatenate([real[0], pseudo[0]])
        y = np.concatenate([real[1], pseudo[1]])
        w = np.concatenate([real[2], strength * pseudo[2]])
        l2 = strength * r.l2 / (1.0 + r.l2_decay * n_labels)
        model = BLR(l2=l2, pi=self.pi(), pi_weight=r.pi_weight, standardise=r.standardise, solver=self.solver,
                    **({"newton_tol": newton_tol} if newton_tol is not None else {}))
        if X.shape[0] == 0:  # nothing to fit (no labels, no pseudo-labels): Topaz's head, whatever the prior
            w0, b0 = head_of(self.feature_model)
            model.coef_, model.intercept_ = w0, b0
            model.prior_coef_, model.prior_intercept_ = ((w0, b0) if self.recipe.prior == "pretrained"
                                                         else (np.zeros_like(w0), 0.0))
        else:
            warm = start if self.warm_start else None
            if warm is not None and warm.coef_ is not None:
                model.coef_, model.intercept_ = warm.coef_, warm.intercept_
            with blas_threads(1):  # small dense products: thread hand-offs cost more than they save
                model.fit(X, y, w, unlabelled=self._unlabelled, prior=self.prior(), warm_start=warm is not None,
                          laplace=laplace)
        model.meta = {"feature_model": self.feature_model, "recipe": r.to_dict(), "radius_px": self.radius_px,
                      "working_pixel_size": float(np.mean([it.mic.frame.working_pixel_size for it in self.items.values()]))}
        if r.prior_strength != "fixed":
            model.meta["prior_strength"] = strength
        return model

    def logits(self, name: str) -> np.ndarray:
        """Current model's logit map on a training micrograph (the pretrained score before any fit)."""
        if self.model is None:
            return self.items[name].fmap.score
        if name not in self._logits:
            self._logits[name] = self.model.logit_map(self.items[name].fmap.features)
        return self._logits[name]

    # --- proposals -----------------------------------------------------------------------------
    def _peaks(self, kind: str, name: str, k: int, exclude):
        """The k best peaks of the entropy, the logit or minus the logit: exactly the full NMS's first k."""
        rw = self.radius_w(name)
        if not self.top_k:
            values = entropy(self.logits(name)) if kind == "entropy" else (
                self.logits(name) if kind == "logit" else -self.logits(name))
            return peaks(values, rw, exclude=exclude)
        if kind == "entropy":
            return entropy_peaks(self.logits(name), rw, k, exclude=exclude)
        values = self.logits(name) if kind == "logit" else -self.logits(name)
        return peaks(values, rw, exclude=exclude, max_peaks=k)

    def _candidates(self, kind: str, labels: list[Label], k: int) -> dict[str, list[tuple[float, float, float, float]]]:
        """Per micrograph: its k best peaks (``_take`` never uses more) as (value, x, y, prob), best first."""
        idx = self._label_index(labels)
        out = {}
        for name, it in self.items.items():
            iy, ix, v = self._peaks(kind, name, k, idx.get(name))
            keep = np.isfinite(v)
            iy, ix, v = iy[keep], ix[keep], v[keep]
            x, y = it.mic.frame.to_original(ix, iy)
            p = sigmoid(self.logits(name)[iy, ix])
            out[name] = list(zip(v.tolist(), x.tolist(), y.tolist(), p.tolist()))
        return out

    def rows(self, points: list[tuple[str, float, float]]) -> np.ndarray:
        """Feature rows at (micrograph, x, y) spots in original pixels, in the given order."""
        dim = self.feature_dim
        out = np.empty((len(points), dim), dtype=np.float32)
        for name in {p[0] for p in points}:
            at = [i for i, p in enumerate(points) if p[0] == name]
            it = self.items[name]
            ix, iy = it.mic.frame.to_working_index([points[i][1] for i in at], [points[i][2] for i in at])
            out[at] = it.fmap.at(iy, ix)
        return out

    def _take_diverse(self, k: int, labels: list[Label]) -> list[Proposal]:
        """``k`` of the ``diversity_pool * k`` most uncertain peaks, spread out in feature space."""
        if k <= 0:
            return []
        m = k * max(1, self.recipe.diversity_pool)
        pool = _best_first(self._candidates("entropy", labels, m))[:m]
        # features on a common scale, so no channel with a large range decides the distance alone
        scale = self._unlabelled.std(0) + 1e-6 if self._unlabelled is not None else 1.0
        P = self.rows([(n, c[1], c[2]) for n, c in pool]) / scale
        real = [l for l in labels if l.micrograph in self.items]
        C = self.rows([(l.micrograph, l.x, l.y) for l in real]) / scale if real else None
        return [Proposal(pool[j][0], pool[j][1][1], pool[j][1][2], pool[j][1][3], "uncertain")
                for j in spread_in_features(P, [c[0] for _, c in pool], k, C)]

    def _take(self, cands: dict, k: int, kind: str, spread: str) -> list[Proposal]:
        if k <= 0:
            return []
        if spread == "micrographs":
            chosen, pos = [], {n: 0 for n in cands}
            names = sorted(cands, key=lambda n: -(cands[n][0][0] if cands[n] else -np.inf))
            while len(chosen) < k and any(pos[n] < len(cands[n]) for n in names):
                for n in names:
                    if pos[n] < len(cands[n]) and len(chosen) < k:
                        chosen.append((n, cands[n][pos[n]]))
                        pos[n] += 1
        else:
            chosen = _best_first(cands)[:k]
        return [Proposal(n, c[1], c[2], c[3], kind) for n, c in chosen]

    def propose(self, k: int, labels: list[Label]) -> list[Proposal]:
        """The k most uncertain peaks (entropy), spread as the recipe says; some confident ones if asked.

        Then, once the recipe's ``audit_after`` answers on the training micrographs are in, its
        ``audits`` per round (``audits``): on the audit micrographs on top of the k, or
        (``audits_on='training'``) on the training micrographs, in place of as many uncertain ones.
        """
        r = self.recipe
        answers = sum(1 for l in labels if l.micrograph in self.items and l.source != "pseudo")
        auditing = r.audits > 0 and answers >= r.audit_after and self.model is not None
        n_aud = min(r.audits, k) if auditing and r.audits_training else 0  # out of the batch
        n_conf = int(round((k - n_aud) * r.confident_fraction)) if self.model is not None else 0
        n_unc = k - n_aud - n_conf
        if r.spread == "features":
            unc = self._take_diverse(n_unc, labels)
        else:
            unc = self._take(self._candidates("entropy", labels, n_unc), n_unc, "uncertain", r.spread)
        props = unc + self._confident(n_conf, labels + [Label(p.micrograph, p.x, p.y, 0) for p in unc])
        if n_aud:
            props += self.audits(n_aud, labels + [Label(p.micrograph, p.x, p.y, 0) for p in props], draw=answers)
        elif auditing and r.audits_apart:
            props += self.audits(r.audits, labels, draw=answers)
        return props

    def audits(self, k: int, labels: list[Label], draw: int = 0) -> list[Proposal]:
        """``k`` of the current picks of the audit micrographs (or, ``audits_on='training'``, of the
        training micrographs), drawn in proportion to their probability.

        Why: the count and the threshold are about the picks (NMS maxima, mostly confident); the
        uncertain proposals never sample them.  Audits apart: on `head` (one view) the training
        micrographs' picks were better than the rest (benchmarks/audit_fits.py).  On the training
        micrographs: with the prior towards zero they are not, and no extra micrograph is needed
        (benchmarks/training_audits.py).  Drawn this way each audit stands for an equal share of
        the expected count.  Picks within a radius of a spot already labelled (or proposed, as
        ``labels`` passes them) are left out.  ``draw`` seeds the draw with the learner's seed, so a
        round re-run asks the same and the next round anew.
        """
        source = self.items if self.recipe.audits_training else self.audit_items
        if k <= 0 or self.model is None or not source:
            return []
        pool = []
        for name, it in source.items():
            zmap = self.logits(name) if name in self.items else self.model.logit_map(it.fmap.features)  # cached
            pk = extract_picks(name, zmap, it.mic.frame, self.radius_px)
            keep = np.ones(len(pk), bool)
            sel = [(l.x, l.y) for l in labels if l.micrograph == name]
            if sel and len(pk):
                lab = np.asarray(sel, float)
                keep = np.hypot(pk.x[:, None] - lab[None, :, 0], pk.y[:, None] - lab[None, :, 1]).min(1) > self.radius_px
            pool += [(name, float(a), float(b), float(p)) for a, b, p in zip(pk.x[keep], pk.y[keep], pk.score[keep])]
        if not pool:
            return []
        w = np.array([q[3] for q in pool])
        rng = np.random.default_rng([self.seed, int(draw), 16])
        take = rng.choice(len(pool), size=min(k, len(pool)), replace=False, p=w / w.sum())
        return [Proposal(pool[i][0], pool[i][1], pool[i][2], pool[i][3], "audit") for i in take]

    def audit_logits(self, points: list[tuple[str, float, float]]) -> np.ndarray:
        """The current model's logits at (audit micrograph, x, y) spots: held out, as it never trains there."""
        out = np.empty(len(points))
        for name in {p[0] for p in points}:
            at = [i for i, p in enumerate(points) if p[0] == name]
            it = self.audit_items[name]
            ix, iy = it.mic.frame.to_working_index([points[i][1] for i in at], [points[i][2] for i in at])
            out[at] = self.model.decision_function(it.fmap.at(iy, ix))
        return out

    def _confident(self, k: int, labels: list[Label]) -> list[Proposal]:
        if k <= 0:
            return []
        n_pos = (k + 1) // 2
        pos = self._take(self._candidates("logit", labels, n_pos), n_pos, "positive", "micrographs")
        neg = self._take(self._candidates("-logit", labels, k - n_pos), k - n_pos, "negative", "micrographs")
        return pos + neg

    def initial_proposals(self, k: int, labels: list[Label] | None = None) -> list[Proposal]:
        """Round 0, from the pretrained score: confident positives, confident negatives, most uncertain."""
        labels = labels or []
        n_pos = max(1, k // 5) if k >= 3 else 0
        n_neg = max(1, k // 5) if k >= 3 else 0
        saved, self.model = self.model, None  # proposals from the pretrained score
        try:
            props = self._take(self._candidates("entropy", labels, k - n_pos - n_neg), k - n_pos - n_neg,
                               "uncertain", "micrographs")
            taken = labels + [Label(p.micrograph, p.x, p.y, 0) for p in props]
            props += self._confident(n_pos + n_neg, taken)
        finally:
            self.model = saved
        return props

    # --- picks ---------------------------------------------------------------------------------
    def score_map(self, fmap: FeatureMap) -> np.ndarray:
        """Logits for picking: calibrated when the model carries a calibration (calibration.attach)."""
        return fmap.score if self.model is None else calibrated(self.model).logit_map(fmap.features)

    def picks(self, mic: Micrograph, fmap: FeatureMap, threshold: float | None = None) -> Picks:
        return extract_picks(mic.name, self.score_map(fmap), mic.frame, self.radius_px, threshold)
