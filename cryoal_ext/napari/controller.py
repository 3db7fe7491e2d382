"""The napari plugin's state and work, without any Qt: open, featurise, label, retrain, predict, export.

Everything goes through the engine the command line uses: ``workflow.featurise`` (the feature
cache), ``learner.ActiveLearner`` (BLR fit and entropy proposals), ``workflow.predict`` and
``extract`` (picks), ``labels.LabelStore`` and ``session.Session`` (labels, model and rounds on
disk), and the existing readers and writers of Topaz txt, RELION STAR and cryoSPARC ``.cs`` files
(the export and import half is ``exchange.FileExchange``).
The widget (``widget.py``) only draws this state and calls these methods, the slow ones
(``load_features``, ``predict``) from a worker thread: both are generators that yield
``(done, total, name)`` after each micrograph, and take a ``check`` callable that can raise to stop.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..acquisition import Proposal
from ..extract import Picks, extract_picks
from ..io import MICROGRAPH_SUFFIXES, list_micrographs, load_micrograph, micrograph_name
from ..labels import Label, LabelStore
from ..learner import ActiveLearner, Item
from ..model import BLR
from ..recipes import Recipe, get_recipe, offered_in, with_audits
from ..session import Session
from ..calibration import CountEstimate, of
from ..workflow import (EngineSettings, MicrographSpec, RoundResult, expected_count, featurise, fit_calibrated,
                        predict, session_audits, suggest_threshold)
from .exchange import FileExchange, stable_uid  # noqa: F401 (stable_uid: part of this module's API)

log = logging.getLogger("cryoal_ext.napari")

Check = Callable[[], None]
Progress = Callable[[str], None]

#: label sources written by the plugin
SOURCE_PROPOSAL = "napari:proposal"
SOURCE_CLICK = "napari:click"

def _quiet(_: str) -> None:
    pass


def lowpass(image: np.ndarray, resolution_A: float, pixel_size_A: float) -> np.ndarray:
    """Gaussian low-pass for display: the response falls to 1/2 at ``resolution_A``."""
    from scipy.ndimage import gaussian_filter

    if not resolution_A or resolution_A <= 2 * pixel_size_A:
        return image
    sigma = np.sqrt(np.log(2) / 2) / np.pi * resolution_A / pixel_size_A
    return gaussian_filter(np.asarray(image, np.float32), sigma)


def _guess_project_dir(first: str, near: Path) -> Path:
    """The folder a project-relative path ``first`` resolves in: the working folder, or above ``near``."""
    if os.path.isabs(first):
        return Path("/")
    for cand in (Path.cwd(), near, *near.parents):
        if (cand / first).exists():
            return cand
    return Path.cwd()


@dataclass
class RoundInfo:
    """What one retrain did."""

    round: int
    n_labels: int
    n_positive: int
    n_proposals: int
    fit_s: float
    propose_s: float
    train: list[str]
    fitted: bool  # False: proposals come from the pretrained score (or a loaded model)
    note: str = ""  # the audits among the proposals and what the probabilities rest on (RoundResult.note)


class LabellingController(FileExchange):
    """State of one labelling session in the viewer: micrographs, labels, model, proposals, picks.

    Reading and writing labels and picks in the hosts' formats: ``FileExchange`` (``exchange.py``).
    """

    def __init__(self, settings: EngineSettings | None = None, recipe: str | Recipe = "default", batch: int = 10,
                 seed: int = 0, session_dir: str | os.PathLike | None = None, audits: int | None = None):
        if settings is None:
            from ..commands.common import default_cache

            settings = EngineSettings(cache_dir=default_cache())
        self.settings = settings
        self.recipe = recipe if isinstance(recipe, Recipe) else get_recipe(offered_in(recipe, "the napari plugin"))
        self.batch = int(batch)
        self.audits = audits  # questions of each batch about the model's own picks (None: the recipe's)
        self.engine_recipe()  # refuse a bad number now, not at the first retrain
        self.seed = int(seed)
        self.specs: dict[str, MicrographSpec] = {}
        self.source: str | None = None
        self.source_kind: str | None = None  # 'mrc', 'folder', 'relion' or 'cryosparc'
        self.project_dir: Path | None = None
        self.notes: list[str] = []
        self._relion_table = None
        self._exposures = None  # cryoSPARC exposures dataset (read, or made for the files on export)
        self.items: dict[str, Item] = {}
        self.session: Session | None = None
        self.store = LabelStore(None)
        self.round = 0
        self.model: BLR | None = None
        self._loaded = False  # self.model came from load_model and no fit replaced it yet
        self._learner: ActiveLearner | None = None
        self._learner_key: tuple = ()
        self.proposals: list[Proposal] = []
        self._audits: list[Proposal] = []  # every audit asked without a session (a session keeps its own)
        self.status: list[str | None] = []  # per proposal: None (pending), 'accepted', 'rejected', 'skipped'
        self.picks: dict[str, Picks] = {}
        self.threshold = 0.5
        self.last_round: RoundInfo | None = None
        if session_dir is not None:
            self.set_session(session_dir)

    # --- opening --------------------------------------------------------------------------------
    def open(self, source: str | os.PathLike | Sequence[str | os.PathLike], project_dir: str | os.PathLike | None = None,
             pixel_size: float | None = None) -> list[str]:
        """Open micrographs: MRC file(s), a folder of them, a RELION micrographs STAR or a cryoSPARC exposures .cs.

        Returns the micrograph names (the keys of labels and picks).  Labels are kept (they are
        keyed by name); features, proposals and picks of a previous source are dropped.
        """
        paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
        if not paths:
            raise ValueError("nothing to open")
        notes: list[str] = []
        relion_table = exposures = None
        if len(paths) == 1 and paths[0].is_dir():
            kind = "folder"
            specs = [MicrographSpec(str(f), micrograph_name(f), pixel_size) for f in list_micrographs(paths[0])]
        elif len(paths) == 1 and paths[0].suffix.lower() == ".star":
            kind = "relion"
            specs, relion_table, project_dir, notes = self._open_relion(paths[0], project_dir, pixel_size)
        elif len(paths) == 1 and paths[0].suffix.lower() == ".cs":
            kind = "cryosparc"
            specs, exposures, project_dir = self._open_cryosparc(paths[0], project_dir, pixel_size)
        else:
            kind = "mrc"
            for p in paths:
                if p.suffix.lower() not in MICROGRAPH_SUFFIXES:
                    raise ValueError(f"{p}: not a micrograph ({', '.join(MICROGRAPH_SUFFIXES)}), a folder, "
                                     "a RELION micrographs .star or a cryoSPARC exposures .cs")
                if not p.exists():
                    raise FileNotFoundError(f"micrograph not found: {p}")
            specs = [MicrographSpec(str(p), micrograph_name(p), pixel_size) for p in paths]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"two micrographs are both named {dup!r}; open them separately")
        self.specs = {s.name: s for s in specs}
        self.source = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files"
        self.source_kind = kind
        self.project_dir = Path(project_dir) if project_dir else None
        self.notes = notes
        self._relion_table = relion_table
        self._exposures = exposures
        self.items = {}
        self._learner, self._learner_key = None, ()
        self.proposals, self.status = [], []
        self.picks = {}
        return names

    def _open_relion(self, path: Path, project_dir, pixel_size):
        from ..relion.micrographs import check_pixel_size, read_header, read_micrographs_star

        table = read_micrographs_star(path, project_dir or ".")
        if project_dir is None:
            project_dir = _guess_project_dir(table.entries[0].name, path.parent)
            table = read_micrographs_star(path, project_dir)
        notes = list(table.notes)
        for e in table.entries:
            if pixel_size:
                e.pixel_size, e.pixel_size_source = pixel_size, "given"
            elif e.path.exists():
                note = check_pixel_size(e, read_header(e.path))
                if note:
                    notes.append(note)
        specs = [MicrographSpec(str(e.path), e.key, e.pixel_size, extra={"relion_name": e.name})
                 for e in table.entries]
        return specs, table, project_dir, notes

    def _open_cryosparc(self, path: Path, project_dir, pixel_size):
        from ..cryosparc.data import exposures_to_specs, load_dataset

        dset = load_dataset(path, "exposures")
        if project_dir is None and len(dset) and "micrograph_blob/path" in dset.fields():
            first = dset["micrograph_blob/path"][0]
            first = first.decode() if isinstance(first, bytes) else str(first)
            project_dir = _guess_project_dir(first, path.parent)
        specs = exposures_to_specs(dset, project_dir, str(path), pixel_size)
        return specs, dset, project_dir

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    # --- features -------------------------------------------------------------------------------
    def _check_shape(self, it: Item) -> None:
        spec = self.specs[it.mic.name]
        if "shape" in spec.extra and self.source_kind == "cryosparc":
            from ..cryosparc.data import check_shape

            check_shape(spec, it.mic.frame.original_shape)

    def load_features(self, names: Iterable[str], progress: Progress | None = None,
                      check: Check | None = None) -> Iterator[tuple[int, int, str]]:
        """Featurise (through the cache) the named micrographs not loaded yet; they join the training set."""
        todo = [n for n in dict.fromkeys(names) if n not in self.items]
        unknown = [n for n in todo if n not in self.specs]
        if unknown:
            raise KeyError(f"unknown micrograph {unknown[0]!r}")
        for i, it in enumerate(featurise([self.specs[n] for n in todo], self.settings, progress or _quiet, check), 1):
            self._check_shape(it)
            self.items[it.mic.name] = it  # the learner copies training features into RAM when they fit
            yield i, len(todo), it.mic.name

    def ensure_features(self, names: Iterable[str], **kw) -> None:
        for _ in self.load_features(names, **kw):
            pass

    def pixel_size_of(self, name: str) -> float:
        if name in self.items:
            return self.items[name].mic.frame.pixel_size
        spec = self.specs[name]
        if spec.pixel_size:
            return float(spec.pixel_size)
        from ..relion.micrographs import read_header

        ps = read_header(spec.path).pixel_size
        if not ps:
            raise ValueError(f"{spec.path}: no pixel size in the MRC header; give one")
        return ps

    def radius_of(self, name: str) -> float:
        """Particle radius in pixels of this micrograph's file."""
        return self.settings.radius_for(self.pixel_size_of(name))

    def set_particle_size(self, radius_px: float | None = None, diameter_A: float | None = None) -> None:
        if not radius_px and not diameter_A:
            raise ValueError("give the particle size: a radius in pixels or a diameter in Angstrom")
        self.settings = replace(self.settings, radius_px=radius_px or None, diameter_A=diameter_A or None)
        self._learner, self._learner_key = None, ()

    def image(self, name: str, lowpass_A: float = 0.0) -> np.ndarray:
        """The micrograph as the engine sees it (Fourier-cropped to the working pixel size, normalised),
        optionally low-passed for display.  World coordinates: multiply by ``scale(name)``."""
        if name in self.items:
            mic = self.items[name].mic
        else:
            spec = self.specs[name]
            mic = load_micrograph(spec.path, self.settings.working_pixel_size, spec.pixel_size, name=name)
        return lowpass(mic.image, lowpass_A, mic.frame.working_pixel_size) if lowpass_A else mic.image

    def scale(self, name: str) -> tuple[float, float]:
        """(y, x) file pixels per displayed pixel."""
        f = self.items[name].mic.frame
        return f.scale_y, f.scale_x

    # --- labels ---------------------------------------------------------------------------------
    def set_session(self, folder: str | os.PathLike) -> None:
        """Keep labels, model and proposals in a session folder (resumes one that exists)."""
        old = self.store.labels
        self.session = Session(folder)
        self.store = self.session.labels
        if old:
            self.store.add(old)
        self.round = max(self.round, self.session.round)  # labels and rounds given before it keep their numbers
        if self.model is None and self.session.model_path.exists():
            self.model = BLR.load(self.session.model_path)

    def asked_audits(self) -> list[Proposal]:
        """Every audit proposal asked: the session's saved rounds and this viewer's (asked before a session was set)."""
        saved = session_audits(self.session) if self.session is not None else []
        seen = {(a.micrograph, round(a.x, 2), round(a.y, 2)) for a in saved}  # the round files keep 3 decimals
        return saved + [a for a in self._audits if (a.micrograph, round(a.x, 2), round(a.y, 2)) not in seen]

    @property
    def labels(self) -> list[Label]:
        """Every current label (one per spot, the newest winning)."""
        return self.store.effective()

    def labels_on(self, name: str) -> list[Label]:
        return [l for l in self.labels if l.micrograph == name]

    def counts(self) -> tuple[int, int]:
        return self.store.counts()

    def add_label(self, name: str, x: float, y: float, label: int, source: str = SOURCE_CLICK) -> bool:
        if name not in self.specs:
            raise KeyError(f"unknown micrograph {name!r}")
        return self.store.add([Label(name, float(x), float(y), int(label), source, self.round)]) > 0

    def remove_label(self, name: str, x: float, y: float, within_px: float | None = None) -> int:
        """Remove the label(s) at (x, y); ``within_px`` defaults to the label store's same-spot distance."""
        return self.store.remove(name, float(x), float(y), within_px)

    def nearest_label(self, name: str, x: float, y: float, within_px: float) -> Label | None:
        best, d2 = None, within_px ** 2
        for l in self.labels_on(name):
            d = (l.x - x) ** 2 + (l.y - y) ** 2
            if d <= d2:
                best, d2 = l, d
        return best

    def sync_labels(self, name: str, x: np.ndarray, y: np.ndarray, label: np.ndarray) -> tuple[int, int]:
        """Make the labels of ``name`` equal to the points given (an edited points layer): labels with no
        point left are removed, points with no label become labels.  Returns (added, removed)."""
        x, y, label = np.asarray(x, float), np.asarray(y, float), np.asarray(label, int)
        cur = self.labels_on(name)
        r2 = 1e-3
        matched = np.zeros(x.size, bool)
        removed = 0
        for l in cur:
            hit = np.flatnonzero(~matched & ((x - l.x) ** 2 + (y - l.y) ** 2 <= r2) & (label == l.label))
            if hit.size:
                matched[hit[0]] = True
            else:
                removed += self.store.remove(name, l.x, l.y, within_px=0.01)
        added = self.store.add([Label(name, float(x[k]), float(y[k]), int(label[k]), SOURCE_CLICK, self.round)
                                for k in np.flatnonzero(~matched)])
        return added, removed

    # --- proposals ------------------------------------------------------------------------------
    @property
    def current_index(self) -> int | None:
        return next((i for i, s in enumerate(self.status) if s is None), None)

    @property
    def current(self) -> Proposal | None:
        i = self.current_index
        return None if i is None else self.proposals[i]

    def pending(self, name: str | None = None) -> list[Proposal]:
        """Proposals not answered yet (skipped ones included), optionally on one micrograph."""
        return [p for p, s in zip(self.proposals, self.status)
                if s in (None, "skipped") and (name is None or p.micrograph == name)]

    def _answer(self, status: str, label: int | None) -> Proposal | None:
        i = self.current_index
        if i is None:
            return None
        p = self.proposals[i]
        if label is not None:
            self.store.add([Label(p.micrograph, p.x, p.y, label, SOURCE_PROPOSAL, self.round)])
        self.status[i] = status
        return self.current

    def accept(self) -> Proposal | None:
        """The current proposal is a particle; returns the next one (None when all are answered)."""
        return self._answer("accepted", 1)

    def reject(self) -> Proposal | None:
        """The current proposal is not a particle."""
        return self._answer("rejected", 0)

    def skip(self) -> Proposal | None:
        """Leave the current proposal unlabelled (it may be proposed again)."""
        return self._answer("skipped", None)

    # --- the round ------------------------------------------------------------------------------
    def training_names(self) -> list[str]:
        """Micrographs the learner uses: every featurised one, plus every labelled one among the inputs."""
        labelled = {l.micrograph for l in self.labels} & set(self.specs)
        return sorted(set(self.items) | labelled)

    def engine_recipe(self) -> Recipe:
        """The recipe with this viewer's audits per batch (``recipes.with_audits``)."""
        return with_audits(self.recipe, self.audits, self.batch)

    def learner(self) -> ActiveLearner:
        names = tuple(sorted(self.items))
        if not names:
            raise ValueError("no micrograph featurised yet: open micrographs and show one first")
        recipe = self.engine_recipe()
        key = (names, recipe)
        if self._learner is None or self._learner_key != key:
            items = [self.items[n] for n in names]
            self._learner = ActiveLearner(items, self.radius_of(names[0]), recipe, self.settings.feature_model,
                                          seed=self.seed)
            self._learner_key = key
        return self._learner

    def retrain(self, progress: Progress | None = None, check: Check | None = None) -> RoundInfo:
        """Fit the BLR on every label (featurising labelled micrographs first), propose the next batch,
        and refresh the picks of the training micrographs.  Without labels: proposals from the
        pretrained score (or from a loaded model)."""
        self.ensure_features(self.training_names(), progress=progress, check=check)
        learner = self.learner()
        labels = [l for l in self.labels if l.micrograph in self.items]
        t = time.perf_counter()
        fitted = bool(labels) or (self.recipe.pseudo_labels > 0 and not self._loaded)  # as labelling_round does
        if fitted:  # Newton, warm-started from the last model; calibrated on the answers and audits
            self.model = fit_calibrated(learner, labels, self.model, self.asked_audits())
            self._loaded = False
        else:  # no labels: the loaded model, else the pretrained score
            learner.model, learner._logits = self.model, {}
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        props = learner.propose(self.batch, labels) if learner.model is not None \
            else learner.initial_proposals(self.batch, labels)
        propose_s = time.perf_counter() - t
        if self.session is None:  # a session keeps them in its round files
            self._audits += [p for p in props if p.kind == "audit"]
        order = {n: i for i, n in enumerate(dict.fromkeys(p.micrograph for p in props))}
        self.proposals = sorted(props, key=lambda p: order[p.micrograph])  # one micrograph after another
        self.status = [None] * len(self.proposals)
        self.picks = {}
        cal = of(self.model)  # the identity for the pretrained score or a model saved before calibration
        for name in learner.items:
            it = self.items[name]
            self.picks[name] = extract_picks(name, cal.logit(learner.logits(name)).astype(np.float32), it.mic.frame,
                                             self.radius_of(name))
        pos = sum(l.label for l in labels)
        note = RoundResult(self.model, self.proposals, len(labels), pos, fit_s, propose_s).note
        info = RoundInfo(self.round, len(labels), pos, len(self.proposals), fit_s, propose_s, list(learner.items),
                         fitted, note)
        if self.session is not None:
            if self.model is not None and fitted:
                self.model.save(self.session.model_path, round=self.round, n_labels=len(labels))
            self.session.save_proposals(self.round, self.proposals)
            self.session.record(front_end="napari", round=self.round, labels=len(labels), positives=pos,
                                train=info.train, fit_s=round(fit_s, 3), propose_s=round(propose_s, 3))
            self.session.save_state(round=self.round + 1)
        self.round += 1
        self.last_round = info
        return info

    # --- prediction -----------------------------------------------------------------------------
    def predict(self, names: Iterable[str] | None = None, progress: Progress | None = None,
                check: Check | None = None) -> Iterator[tuple[int, int, str]]:
        """Picks (every peak above 1e-4) with the current model on the named micrographs (default all);
        yields (done, total, name).  The threshold is applied on display and export."""
        names = list(dict.fromkeys(names if names is not None else self.specs))
        fresh = [n for n in names if n not in self.items]
        stream = featurise([self.specs[n] for n in fresh], self.settings, progress or _quiet, check)

        def items():
            for n in names:
                if n in self.items:
                    if check:
                        check()
                    yield self.items[n]
                else:
                    it = next(stream)
                    self._check_shape(it)
                    yield it

        for i, (it, pk) in enumerate(predict(items(), self.model, lambda it: self.radius_of(it.mic.name)), 1):
            self.picks[pk.name] = pk
            yield i, len(names), pk.name
        self.threshold = self.suggest_threshold()

    def suggest_threshold(self) -> float:
        picks = list(self.picks.values())  # a copy: predict may be adding to it in the worker thread
        return suggest_threshold(np.concatenate([p.score for p in picks]) if picks else np.empty(0))

    def picks_above(self, name: str, threshold: float | None = None) -> Picks | None:
        pk = self.picks.get(name)
        return None if pk is None else pk.above(self.threshold if threshold is None else threshold)

    def expected_count(self) -> CountEstimate:
        """The sum of every pick's calibrated probability (the model's estimate of the particle count), with a range."""
        picks = list(self.picks.values())  # a copy: predict may be adding to it in the worker thread
        return expected_count(np.concatenate([p.score for p in picks]) if picks else np.empty(0), self.model)

    def count(self, threshold: float | None = None) -> int:
        t = self.threshold if threshold is None else threshold
        return int(sum(int((p.score >= t).sum()) for p in list(self.picks.values())))

    # --- model ----------------------------------------------------------------------------------
    def save_model(self, path: str | os.PathLike) -> Path:
        if self.model is None:
            raise ValueError("no model yet: label some proposals and retrain first")
        return self.model.save(path, round=self.round, n_labels=len(self.labels), radius_px=self.settings.radius_px,
                               diameter_A=self.settings.diameter_A)

    def load_model(self, path: str | os.PathLike) -> BLR:
        model = BLR.load(path)
        fm = model.meta.get("feature_model", self.settings.feature_model)
        if fm != self.settings.feature_model:
            if self.items:
                raise ValueError(f"{path}: model made on {fm} features, but micrographs are loaded with "
                                 f"{self.settings.feature_model}; reopen them after loading the model")
            self.settings = replace(self.settings, feature_model=fm)
        if not self.settings.radius_px and not self.settings.diameter_A:
            r, d = model.meta.get("radius_px"), model.meta.get("diameter_A")
            if r or d:
                self.settings = replace(self.settings, radius_px=r, diameter_A=d)
        self.model = model
        self._loaded = True
        if self._learner is not None:
            self._learner.model, self._learner._logits = model, {}
        self.picks = {}
        return model
