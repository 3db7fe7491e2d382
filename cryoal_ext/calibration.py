"""Calibrated pick probabilities: Platt scaling of the BLR logit on the user's own answers, held out.

Why: the BLR's probabilities are over-confident (the prior towards Topaz's head, the expectation
term and the pseudo-labels all shape the logit's scale, none of them its calibration), so the
sum of the picks' probabilities overstates the particle count and the expected-F1 threshold sits
too low.  The answers are the only unbiased evidence there is; each is scored by a model fitted
without its round (cross-validation over rounds), and a two-parameter map ``a * logit + b`` is
fitted to those held-out scores with a weak prior towards the identity (few answers: little
change).

What those answers cannot see (issue 16, measured): the proposals are chosen uncertain, so they
say much about ``P(particle | logit)`` near the decision boundary and little about the picks
(NMS maxima, mostly confident), where the count and the threshold live; there the map only
extrapolates, and the false positives among confident picks stay uncounted.  Audits close that:
proposals of kind ``audit`` (``Recipe.audits``) are picks of micrographs the model never trains
on, drawn in proportion to their probability; the map fitted on the held-out answers becomes the
prior centre of a second Platt fit on the audits (selection by the logit alone does not bias a fit
of P(particle | logit)).  Why micrographs apart: on `head` (one view) the model's picks on its
training micrographs were better than elsewhere (benchmarks/audit_fits.py).  With the prior towards
zero they are not (benchmarks/training_audits.py), so ``audits_on='training'`` audits the training
micrographs' own picks inside the batch; the model trains on those answers, so each is scored by
the refit that left out its round (``training_audit_map``).

The map is affine in the logit with ``a > 0``, so the ranking, the picks and the AP are the
same as the raw model's; only the probabilities (and so the suggested threshold and the
expected count) change.  The proposals are always chosen on the raw logit: calibration never
changes what the user is asked.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imports for type hints only: learner imports this module's users
    from .acquisition import Proposal
    from .labels import Label
    from .learner import ActiveLearner
    from .model import BLR

META_KEY = "calibration"


@dataclass(frozen=True)
class CalibrationSettings:
    """How the held-out answers are made and how strongly the map is held to the identity."""

    folds: int = 5  # rounds (or, with fewer than 3 rounds, answers) dealt into this many folds
    prior_sd: float = 1.0  # Gaussian prior on (a - 1) and b: with ~10 answers the map stays near the identity
    # fewer answers (or one class only): the identity.  Why 60: measured on every split of EMPIAR-10028
    # and -10017 (issue 16), the map fitted on 10-25 answers made the threshold worse on some splits
    # (F1 lost up to 0.44 on 10017), on 50 it still did on one 10017 split; on 100 it was better on
    # every split of both, in count and in F1 at the threshold
    min_answers: int = 60
    min_slope: float = 0.05  # a stays positive, so the ranking never flips
    # the refits start from the full fit and only score the held-out answers: max|grad| < 1e-5 gave
    # the same map to 1e-5 (10028, 100 labels) in 14 Newton steps over the 5 refits instead of 20
    refit_tol: float = 1e-5
    # audits: fewer matched to an answer than this and the map stays the held-out answers' one
    min_audits: int = 5


@dataclass(frozen=True)
class Calibration:
    """``calibrated logit = a * logit + b``; ``n`` answers (``n_positive`` of them positive) behind it."""

    a: float = 1.0
    b: float = 0.0
    n: int = 0
    n_positive: int = 0
    folds: int = 0
    audits: int = 0  # audited picks the map was refined on (0: answers only)
    # the posterior covariance of (a, b) (Laplace, at the fit): var a, cov ab, var b; zeros: none (raw or old)
    cov: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def logit(self, z):
        return self.a * np.asarray(z, dtype=np.float64) + self.b

    def prob(self, z):
        return 1.0 / (1.0 + np.exp(-self.logit(z)))

    def to_dict(self) -> dict:
        d = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        d["cov"] = [float(f"{v:.6g}") for v in self.cov]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        if not isinstance(d, dict):
            return cls()
        try:
            cal = cls(a=float(d.get("a", 1.0)), b=float(d.get("b", 0.0)), n=int(d.get("n", 0)),
                      n_positive=int(d.get("n_positive", 0)), folds=int(d.get("folds", 0)),
                      audits=int(d.get("audits", 0)))
        except (TypeError, ValueError):
            return cls()
        try:  # a damaged range costs the range only, never the map
            cov = tuple(float(v) for v in d.get("cov", (0.0, 0.0, 0.0)))
        except (TypeError, ValueError):
            return cal
        ok = len(cov) == 3 and all(np.isfinite(cov)) and cov[0] >= 0 and cov[2] >= 0
        return replace(cal, cov=cov) if ok else cal


def platt(z: np.ndarray, y: np.ndarray, s: CalibrationSettings = CalibrationSettings(),
          centre: tuple[float, float] = (1.0, 0.0), min_n: int | None = None) -> Calibration:
    """MAP fit of ``P(y=1) = sigmoid(a z + b)``, Gaussian prior centred on ``centre`` (the identity), Newton.

    Below ``min_n`` values (``s.min_answers``) the map is ``centre``; with one class only, too
    (the identity prior has nothing to weigh).  With a centre other than the identity one class is
    enough: all-positive audits say the picks are at least as good as the centre map claims.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, npos = int(z.size), int(y.sum())
    at_identity = tuple(centre) == (1.0, 0.0)
    if n < (s.min_answers if min_n is None else min_n) or (at_identity and npos in (0, n)):
        return Calibration(a=float(centre[0]), b=float(centre[1]), n=n, n_positive=npos)
    lam = 1.0 / s.prior_sd ** 2
    A = np.c_[z, np.ones(n)]
    centre = np.array(centre, dtype=np.float64)

    def objective(th):
        u = A @ th
        return float(np.sum(np.logaddexp(0.0, u) - y * u) + 0.5 * lam * np.sum((th - centre) ** 2))

    def hessian(th):
        p = 0.5 * (1.0 + np.tanh(0.5 * (A @ th)))
        return p, (A * (p * (1.0 - p))[:, None]).T @ A + lam * np.eye(2)

    theta, f = centre.copy(), objective(centre)
    for _ in range(100):  # damped Newton: the objective is convex, the backtracking keeps each step downhill
        p, H = hessian(theta)
        g = A.T @ (p - y) + lam * (theta - centre)
        step, t = np.linalg.solve(H, g), 1.0
        while t > 1e-6 and objective(theta - t * step) > f:
            t *= 0.5
        theta = theta - t * step
        f = objective(theta)
        if np.abs(t * step).max() < 1e-9:
            break
    C = np.linalg.inv(hessian(theta)[1])  # Laplace: how far the answers pin the map down
    return Calibration(a=float(max(theta[0], s.min_slope)), b=float(theta[1]), n=n, n_positive=npos,
                       cov=(float(C[0, 0]), float(C[0, 1]), float(C[1, 1])))


def answer_folds(labels: list["Label"], k: int) -> np.ndarray:
    """Fold of each answer: whole rounds when there are at least 3 of them, else answers dealt in turn."""
    rounds = sorted({l.round for l in labels})
    if len(rounds) >= 3:
        k = min(k, len(rounds))
        where = {r: i % k for i, r in enumerate(rounds)}
        return np.array([where[l.round] for l in labels])
    return np.arange(len(labels)) % min(k, max(len(labels), 1))


def answers(learner: "ActiveLearner", labels: list["Label"]) -> list["Label"]:
    """The user's yes/no answers on the learner's training micrographs (no pseudo-labels, no skips)."""
    return [l for l in labels if l.micrograph in learner.items and l.source != "pseudo" and l.label in (0, 1)]


def audit_answers(learner: "ActiveLearner", labels: list["Label"], audits) -> list[tuple["Label", "Proposal"]]:
    """(answer, audit) for each audited pick answered: the nearest answer within a radius of it, each answer once.

    Only answers on the micrographs the recipe audits count: its audit micrographs (never trained
    on), or its training micrographs for ``audits_on='training'``.
    """
    where = learner.items if learner.recipe.audits_training else learner.audit_items
    real = [l for l in labels if l.micrograph in where and l.source != "pseudo" and l.label in (0, 1)]
    used, out = set(), []
    for a in audits:
        if getattr(a, "kind", "audit") != "audit" or a.micrograph not in where:
            continue
        near = [(np.hypot(l.x - a.x, l.y - a.y), i) for i, l in enumerate(real)
                if l.micrograph == a.micrograph and i not in used]
        near = [(d, i) for d, i in near if d <= learner.radius_px]
        if near:
            i = min(near)[1]
            used.add(i)
            out.append((real[i], a))
    return out


def held_out_scores(learner: "ActiveLearner", real: list["Label"], folds: int, warm: "BLR | None", tol: float,
                    strength: float | None = None, at: list[list[tuple[str, float, float]]] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each answer's logit under a model fitted (from ``warm``, at ``strength``) on the other folds; the folds.

    ``at``: the spots where each answer is scored, its highest logit among them (default: the
    answer's own spot; an audit's answer: around the audited pick, ``pick_window``).
    Pseudo-labels are kept in every fit (``learner.fit_model`` adds them); only the answers are held out.
    """
    values, fold = held_out_values(learner, real, folds, warm, tol, strength, at)
    return np.array([v.max() for v in values]), fold


def held_out_values(learner: "ActiveLearner", real: list["Label"], folds: int, warm: "BLR | None", tol: float,
                    strength: float | None = None, at: list[list[tuple[str, float, float]]] | None = None
                    ) -> tuple[list[np.ndarray], np.ndarray]:
    """``held_out_scores`` before the maximum: each answer's held-out logits at every one of its spots.

    Why apart: two models scored on the same answers and folds can be combined spot by spot before
    the maximum is taken (benchmarks/backbone_choice.py, the mean of two backbones' logits).
    """
    fold = answer_folds(real, folds)
    at = at if at is not None else [[(l.micrograph, l.x, l.y)] for l in real]
    values: list[np.ndarray] = [np.empty(0)] * len(real)
    for f in np.unique(fold):
        out = np.flatnonzero(fold == f)
        model = learner.fit_model([l for l, g in zip(real, fold) if g != f], warm, newton_tol=tol, strength=strength)
        spots = [p for i in out for p in at[i]]
        v = model.decision_function(learner.rows(spots))
        for i, seg in zip(out, np.split(v, np.cumsum([len(at[i]) for i in out])[:-1])):
            values[i] = seg
    return values, fold


def pick_window(learner: "ActiveLearner", audit: "Proposal", fraction: float = 0.5) -> list[tuple[str, float, float]]:
    """The working pixels within ``fraction`` of a particle radius of an audited pick, as original-pixel spots.

    Why: an audit asked rounds ago was a pick of the model of that round; by now the model's pick
    for the same particle (or the same speck) may sit a few pixels away, and the logit at the old
    spot, off the new peak, would say "unlikely" of a particle the user confirmed.  The highest
    logit nearby is the current model's pick there.  Measured: one 10028 run whose audits started
    at 20 answers had a confirmed audit scored -5.5 at its old spot, which flattened the map.
    """
    it = learner.items[audit.micrograph]
    fr = it.mic.frame
    r = learner.radius_px * fraction
    sx, sy = fr.scale_x, fr.scale_y
    ny, nx = fr.original_shape
    xs = audit.x + sx * np.arange(-np.ceil(r / sx), np.ceil(r / sx) + 1)
    ys = audit.y + sy * np.arange(-np.ceil(r / sy), np.ceil(r / sy) + 1)
    gx, gy = np.meshgrid(xs, ys)
    keep = (np.hypot(gx - audit.x, gy - audit.y) <= r) & (gx >= 0) & (gy >= 0) & (gx <= nx - 1) & (gy <= ny - 1)
    return [(audit.micrograph, audit.x, audit.y)] + [(audit.micrograph, float(x), float(y))
                                                     for x, y in zip(gx[keep], gy[keep])]


def held_out_logits(learner: "ActiveLearner", labels: list["Label"],
                    s: CalibrationSettings = CalibrationSettings()) -> tuple[np.ndarray, np.ndarray, int]:
    """Each answer's held-out logit (``held_out_scores`` from the current fit), its label, the fold count."""
    real = answers(learner, labels)
    if len(real) < s.min_answers:
        return np.empty(0), np.empty(0), 0
    z, fold = held_out_scores(learner, real, s.folds, learner.model, s.refit_tol)
    return z, np.array([l.label for l in real], dtype=np.float64), int(np.unique(fold).size)


def calibrate(learner: "ActiveLearner", labels: list["Label"], s: CalibrationSettings = CalibrationSettings(),
              audits=()) -> Calibration:
    """The calibration of the learner's current fit: from its held-out answers, refined on answered audits.

    An audit's logit is the current model's at the audited spot (the pick, not an answer's
    re-centred position): held out, as the model never trains on an audit micrograph.  Audits of
    the training micrographs are scored by the refits instead (``training_audit_map``).
    """
    if learner.recipe.audits_training:
        return training_audit_map(learner, labels, audits, s)
    return refine_on_audits(learner, labels, answers_map(learner, labels, s), audits, s)


def answers_map(learner: "ActiveLearner", labels: list["Label"], s: CalibrationSettings = CalibrationSettings()
                ) -> Calibration:
    """The map from the held-out answers alone (the costly part: one refit per fold)."""
    real = answers(learner, labels)
    n, npos = len(real), sum(l.label for l in real)
    if n < s.min_answers:
        return Calibration(n=n, n_positive=npos)  # too few answers to move the probabilities: raw ones
    z, y, k = held_out_logits(learner, labels, s)
    cal = platt(z, y, s)
    return Calibration(cal.a, cal.b, n, npos, k, cov=cal.cov)


def training_audit_map(learner: "ActiveLearner", labels: list["Label"], audits=(),
                       s: CalibrationSettings = CalibrationSettings()) -> Calibration:
    """The map for audits of the training micrographs (``audits_on='training'``): one set of refits by rounds.

    Every answer is scored by a model fitted without its round, an audit's answer at the audited
    pick (the highest logit within half a radius of it: ``pick_window``).  The uncertain answers
    give the prior centre (as ``answers_map``); the audits move it.  Why held out: the model trains
    on an audit once it is answered, so its current logit there is no longer a prediction.
    """
    real = answers(learner, labels)
    n, npos = len(real), sum(l.label for l in real)
    if n < s.min_answers:
        return Calibration(n=n, n_positive=npos)
    pick = {id(l): pick_window(learner, a) for l, a in audit_answers(learner, labels, audits)}
    z, fold = held_out_scores(learner, real, s.folds, learner.model, s.refit_tol,
                              at=[pick.get(id(l), [(l.micrograph, l.x, l.y)]) for l in real])
    y = np.array([l.label for l in real], dtype=np.float64)
    audited = np.array([id(l) in pick for l in real])
    m = audited_platt(z, y, audited, s)
    used = int(audited.sum()) if audited.sum() >= s.min_audits else 0
    return Calibration(m.a, m.b, n, npos, int(np.unique(fold).size), audits=used, cov=m.cov)


def audited_platt(z: np.ndarray, y: np.ndarray, audited: np.ndarray,
                  s: CalibrationSettings = CalibrationSettings()) -> Calibration:
    """The map from held-out logits: the uncertain answers give the prior centre, the audits (``audited``) move it.

    Below ``s.min_audits`` audits the centre alone.  Only ``a``, ``b`` and ``cov`` are set.
    """
    centre = platt(z[~audited], y[~audited], s)
    if audited.sum() < s.min_audits:
        return centre
    return platt(z[audited], y[audited], s, centre=(centre.a, centre.b), min_n=s.min_audits)


def refine_on_audits(learner: "ActiveLearner", labels: list["Label"], cal: Calibration, audits=(),
                     s: CalibrationSettings = CalibrationSettings()) -> Calibration:
    """``cal`` (``answers_map``) moved as far as the answered audits say; ``cal`` itself below the gates.

    Audits of the training micrographs need their own held-out refits: ``training_audit_map``.
    """
    if learner.recipe.audits_training:
        return training_audit_map(learner, labels, audits, s)
    if cal.n < s.min_answers:
        return cal
    pairs = audit_answers(learner, labels, audits)
    if len(pairs) < s.min_audits:
        return cal
    za = learner.audit_logits([(a.micrograph, a.x, a.y) for _, a in pairs])
    ya = np.array([l.label for l, _ in pairs], dtype=np.float64)
    ref = platt(za, ya, s, centre=(cal.a, cal.b), min_n=s.min_audits)
    return replace(cal, a=ref.a, b=ref.b, audits=len(pairs), cov=ref.cov)


@dataclass(frozen=True)
class CountEstimate:
    """The model's particle count: the sum of the picks' calibrated probabilities, and a range around it."""

    expected: float
    low: float | None = None  # None: no range (probabilities not calibrated)
    high: float | None = None
    level: float = 0.9

    @property
    def text(self) -> str:
        return f"{self.expected:.0f} ({self.range_text})"

    @property
    def range_text(self) -> str:
        if self.low is None:
            return "probabilities not calibrated: no range"
        return f"{self.level:.0%} range {self.low:.0f}-{self.high:.0f}"

    def to_dict(self) -> dict:
        return {"expected": round(self.expected, 1), "low": None if self.low is None else round(self.low, 1),
                "high": None if self.high is None else round(self.high, 1), "level": self.level}

    @classmethod
    def from_dict(cls, d) -> "CountEstimate | None":
        """What ``to_dict`` wrote (a job's summary.json); None if it is not there or not readable."""
        if not isinstance(d, dict) or not isinstance(d.get("expected"), (int, float)):
            return None
        low, high = d.get("low"), d.get("high")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float))):
            low = high = None
        level = d.get("level", 0.9)
        return cls(float(d["expected"]), low, high, float(level) if isinstance(level, (int, float)) else 0.9)


def count_estimate(scores: np.ndarray, cal: Calibration, level: float = 0.9) -> CountEstimate:
    """The expected count with a range from the map's own uncertainty (the delta method on ``cal.cov``).

    ``scores``: the picks' calibrated probabilities.  Why a range: with ~15 audits the map, and so
    the count, is uncertain by about +-15-25% (benchmarks/count_limits.py); the range says so
    where a bare number would not.  It leaves out what the map cannot see (micrographs unlike the
    training ones), so it is measured: issue 16's protocol, README "How many particles".
    """
    from statistics import NormalDist

    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    e = float(p.sum())
    if not any(cal.cov):
        return CountEstimate(e, level=level)
    z = (np.log(p) - np.log1p(-p) - cal.b) / cal.a  # back to the raw logit the map was fitted on
    w = p * (1.0 - p)
    g = np.array([np.sum(w * z), np.sum(w)])  # d(count) / d(a, b)
    va, cab, vb = cal.cov
    sd = float(np.sqrt(max(g @ np.array([[va, cab], [cab, vb]]) @ g, 0.0)))
    k = NormalDist().inv_cdf(0.5 + level / 2)
    return CountEstimate(e, max(e - k * sd, 0.0), e + k * sd, level)


def attach(model: "BLR", cal: Calibration) -> "BLR":
    """Store ``cal`` in the model's description (saved with it), leaving its weights raw for the next round."""
    model.meta[META_KEY] = cal.to_dict()
    return model


def of(model: "BLR | None") -> Calibration:
    """The calibration a model carries (the identity for none, or for a model saved before calibration)."""
    return Calibration.from_dict(model.meta.get(META_KEY)) if model is not None else Calibration()


def calibrated(model: "BLR | None") -> "BLR | None":
    """A copy whose weights give calibrated logits (``a w, a b0 + b``): every linear path (CPU, GPU head) uses it.

    A model already folded is returned as is, so applying this twice is harmless.
    """
    if model is None or META_KEY not in model.meta or model.meta.get("calibrated"):
        return model
    cal = of(model)
    out = copy.copy(model)
    out.coef_ = cal.a * np.asarray(model.coef_, dtype=np.float64)
    out.intercept_ = float(cal.a * model.intercept_ + cal.b)
    out.meta = {**model.meta, "calibrated": True}
    return out
