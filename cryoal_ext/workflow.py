"""Steps every front end shares: load + featurise, one labelling round, prediction, thresholds."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from .acquisition import Proposal
from .calibration import CountEstimate, attach, calibrate, calibrated, count_estimate, of
from .extract import Picks
from .features import DEFAULT_FEATURE_MODEL, FeatureCache
from .io import load_micrograph
from .learner import ActiveLearner, Item
from .model import BLR
from .recipes import Recipe
from .session import Session

Progress = Callable[[str], None]


@dataclass
class MicrographSpec:
    """A micrograph as a host names it: its file, the name used in our files, and its pixel size."""

    path: str
    name: str
    pixel_size: float | None = None
    extra: dict = field(default_factory=dict)  # host-specific fields (RELION name, cryoSPARC uid, ...)


@dataclass
class EngineSettings:
    radius_px: float | None = None  # particle radius in micrograph pixels
    diameter_A: float | None = None  # alternative to radius_px, converted with each micrograph's pixel size
    feature_model: str = DEFAULT_FEATURE_MODEL
    working_pixel_size: float = 8.0
    cache_dir: str | None = None
    device: str | None = None

    def radius_for(self, pixel_size: float) -> float:
        if self.radius_px:
            return float(self.radius_px)
        if self.diameter_A:
            return float(self.diameter_A) / (2.0 * pixel_size)
        raise ValueError("give the particle size: a radius in pixels or a diameter in Angstrom")


def featurise(specs: Iterable[MicrographSpec], s: EngineSettings, progress: Progress = print,
              check: Callable[[], None] | None = None) -> Iterator[Item]:
    """Load each micrograph and its (cached) features, one at a time; ``check`` runs between micrographs."""
    cache = FeatureCache(s.cache_dir, s.feature_model, s.device)
    specs = list(specs)
    t = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        if check:
            check()
        mic = load_micrograph(spec.path, s.working_pixel_size, spec.pixel_size, name=spec.name)
        item = Item(mic, cache.get(mic))
        dt = time.perf_counter() - t
        progress(f"features {i}/{len(specs)} {spec.name}: {mic.frame.original_shape} -> {mic.frame.working_shape}, "
                 f"{i / dt:.2f} mic/s" if dt > 0 else f"features {i}/{len(specs)} {spec.name}")
        yield item


def choose_training(names: list[str], n: int, seed: int = 0, labelled: Iterable[str] = (), keep_free: int = 0
                    ) -> list[str]:
    """Training micrographs: a seeded random choice, plus every micrograph that already has labels.

    ``keep_free``: leave at least that many out (an audit micrograph) where the draw, not the labels,
    would take them: drawn micrographs without labels are given back, the last in name order first.
    """
    names = sorted(names)
    labelled = set(labelled) & set(names)
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(names, size=min(n, len(names)), replace=False).tolist()) if names else set()
    drawn = sorted(chosen - labelled)
    while drawn and len(names) - len(chosen | labelled) < keep_free:
        chosen.discard(drawn.pop())
    return sorted(chosen | labelled)


# Audit micrographs a session keeps (fewer if there are not so many untrained ones).  Why 2: on EMPIAR-10017 one
# audit micrograph unlike the rest mis-calibrated three of 15 splits; audits spread over two lost less F1 (mean
# 0.022 vs 0.033, README "Audits")
AUDIT_MICROGRAPHS = 2


def choose_audit(session: Session, names: list[str], train: list[str], recipe: Recipe, seed: int = 0) -> list[str]:
    """The audit micrographs of a recipe with audits: chosen once among those not trained on, then kept.

    Kept in the session's state, so its answers are never trained on in a later round (a front end
    leaves it out of its training choice: ``audit_micrographs``) and its audits stay comparable.
    """
    kept = [n for n in audit_micrographs(session) if n in names]
    if kept or not recipe.audits_apart:
        return kept
    rest = sorted(n for n in names if n not in train)
    if not rest:
        return []
    k = min(AUDIT_MICROGRAPHS, len(rest))
    chosen = sorted(str(n) for n in np.random.default_rng([seed, 23]).choice(rest, size=k, replace=False))
    session.save_state(audit_micrographs=chosen)
    return chosen


def audit_micrographs(session: Session) -> list[str]:
    """Micrographs this session audits (never trained on); empty for a session without audits."""
    return list(session.state.get("audit_micrographs", []))


@dataclass
class RoundResult:
    model: BLR | None
    proposals: list[Proposal]
    n_labels: int
    n_positive: int
    fit_s: float
    propose_s: float

    @property
    def note(self) -> str:
        """What a user should know of this round beyond the counts: its audits and the calibration behind
        the probabilities (the same sentence in every front end's log)."""
        k = sum(p.kind == "audit" for p in self.proposals)
        ask = f"{k} of the {len(self.proposals)} queries are the model's own picks (audits): review them as any other"
        cal = of(self.model) if self.model is not None else None
        if cal is None or cal.n == 0 or (cal.a, cal.b) == (1.0, 0.0):
            how = "probabilities not calibrated yet (too few answers)"
        else:
            how = (f"probabilities calibrated on {cal.n} answers held out by rounds"
                   + (f" and {cal.audits} audited picks" if cal.audits else ""))
        return (ask + "; " if k else "") + how


def _previous_model(session: Session, feature_model: str) -> BLR | None:
    """Last round's model as the solver's starting point (same optimum, fewer steps); None if unusable."""
    try:
        prev = BLR.load(session.model_path) if session.model_path.exists() else None
    except (OSError, ValueError):  # BLR.load reports any damage as ValueError
        return None
    if prev is None or prev.meta.get("feature_model", feature_model) != feature_model:
        return None
    return prev


def session_audits(session: Session) -> list:
    """Every audited pick the session has asked about (proposals of kind ``audit``), for the calibration."""
    out = []
    for r in session.proposal_rounds():
        try:
            out += [p for p in session.load_proposals(r) if p.kind == "audit"]
        except (OSError, ValueError):  # an unreadable proposals file is the review's to refuse, not the fit's
            continue
    return out


def fit_calibrated(learner: ActiveLearner, labels: list, start: BLR | None = None, audits: Iterable = ()) -> BLR:
    """Fit on every label, then attach the calibration held out over rounds: the fit of every front end's round.

    The weights stay raw (the next round's proposals rank by them); picks and thresholds use the
    calibrated map (``calibrated``).  ``audits``: every audit proposal asked so far, answered or not.
    """
    model = learner.fit(labels, start=start)
    return attach(model, calibrate(learner, labels, audits=list(audits)))


def labelling_round(session: Session, items: list[Item], recipe: Recipe, radius_px: float, batch: int,
                    feature_model: str, seed: int = 0, audit_items: list[Item] = ()) -> RoundResult:
    """Fit on every label so far, propose the next batch, save model and proposals in the session.

    ``audit_items``: the audit micrograph(s) (``choose_audit``), for a recipe with audits.
    """
    learner = ActiveLearner(items, radius_px, recipe, feature_model, seed=seed, audit_items=audit_items)
    labels = session.labels.effective()
    t = time.perf_counter()
    model = None
    if labels or recipe.pseudo_labels > 0:
        model = fit_calibrated(learner, labels, _previous_model(session, feature_model), session_audits(session))
        model.save(session.model_path, round=session.round, n_labels=len(labels))
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    props = learner.initial_proposals(batch, labels) if model is None else learner.propose(batch, labels)
    propose_s = time.perf_counter() - t
    session.save_proposals(session.round, props)
    pos, _ = session.labels.counts()
    return RoundResult(model, props, len(labels), pos, fit_s, propose_s)


def predict(items: Iterable[Item], model: BLR | None, radius_px: float | Callable[[Item], float],
            threshold: float | None = None) -> Iterator[tuple[Item, Picks]]:
    """Picks per micrograph from the model's calibrated score (the pretrained score when ``model`` is None)."""
    from .extract import extract_picks

    model = calibrated(model)
    for it in items:
        r = radius_px(it) if callable(radius_px) else radius_px
        logits = it.fmap.score if model is None else model.logit_map(it.fmap.features)
        yield it, extract_picks(it.mic.name, logits, it.mic.frame, r, threshold)


def expected_count(scores: np.ndarray, model: BLR | None) -> CountEstimate:
    """The model's own estimate of the particle count (the sum of the picks' calibrated probabilities),
    with the range the calibration's uncertainty gives (README "How many particles")."""
    return count_estimate(np.asarray(scores, dtype=np.float64), of(model))


def suggest_threshold(scores: np.ndarray) -> float:
    """Probability threshold that maximises the expected F1 if the probabilities are calibrated.

    Give it calibrated probabilities (``predict`` returns them for a model a round has calibrated):
    on the raw BLR ones it sits too low (issue 16: F1 0.798 where the best threshold gives 0.845).
    """
    s = np.sort(np.asarray(scores, float))[::-1]
    if s.size == 0:
        return 0.5
    etp = np.cumsum(s)
    f1 = 2 * etp / (np.arange(1, s.size + 1) + s.sum())
    return float(s[int(np.argmax(f1))])
