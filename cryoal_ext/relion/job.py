"""RELION External job: one active-learning round per run; the final run writes picks for Extract.

RELION runs, from the project folder (``relion_`` in the script path makes it append
``--pipeline_control``)::

    relion_scripts/cryoal_relion.py --o External/job005/ --in_mics CtfFind/job003/micrographs_ctf.star \
        --diameter 300 --j 4 --pipeline_control External/job005/

Round 0 writes ``queries.star`` (proposals to review) and ``autopick.star`` (current picks on the
training micrographs) as coordinate nodes.  The user opens ``queries`` with RELION's Display
button (or loads them in a Manual picking job), deletes proposals that are not particles, adds
missed ones (CTRL+1 then click: a red, negative pick), saves, and runs the job again ("Continue"
or a re-run): kept = positive, deleted = negative, added = positive.  ``--predict true`` or a
``--threshold`` makes the run final: picks for every micrograph, FOM = probability.  The job
folder keeps the session (labels.tsv, session.json, proposals/, rounds/, model.npz), so a crashed
or repeated run loses no labels.  See docs/relion.md.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import relion as R
from .atomic import LockedError, copy_file, folder_lock, write_json
from .review import apply_answers
from .features import DEFAULT_FEATURE_MODEL, parse_feature_model

JOB_PREFIX = "cryoal relion"
TRUE_WORDS = {"", "1", "true", "yes", "y", "on"}
FALSE_WORDS = {"0", "false", "no", "n", "off", "none"}


# --- settings --------------------------------------------------------------------------------
@dataclass
class JobSettings:
    """What one run of the External job was asked to do (parsed from RELION's command line)."""

    outdir: str
    in_mics: str | None = None
    in_coords: str | None = None
    in_parts: str | None = None
    reviewed: str | None = None  # like --in_coords, but a parameter (editable when RELION continues a job)
    ignored_inputs: dict = field(default_factory=dict)  # --in_movies, --in_3dref, --in_mask
    diameter: float | None = None  # particle diameter in Angstrom (RELION's convention)
    radius_px: float | None = None  # alternative: particle radius in micrograph pixels
    predict: bool = False
    threshold: float | None = None  # probability; given -> final run
    model: str | None = None  # model.npz to apply (final run, no labels needed)
    batch: int = 10
    train_micrographs: int = 2
    max_train_micrographs: int = 12
    recipe: str = "default"
    seed: int = 0
    labels: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    relion_version: str | None = None
    feature_model: str = DEFAULT_FEATURE_MODEL
    working_pixel_size: float | None = None  # None: the model's (with --model), else 8
    pixel_size: float | None = None  # override for every micrograph
    device: str | None = None
    cache_dir: str | None = None
    cache_all: bool = False
    threads: int | None = None
    min_fom: float = 0.01  # lowest probability written to candidates.star
    overlays: int = 4
    continue_from: str | None = None
    unknown: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return bool(self.predict or self.threshold is not None or self.model)


# Options RELION (or the user, as External job parameters) may pass.  Every value option takes
# nargs='?' so that a parameter left empty in the GUI (a bare flag) does not break parsing.
_VALUE_OPTIONS = {
    # dest: (option strings, help)
    "o": (["--o"], "job folder, e.g. External/job005/ (RELION)"),
    "in_mics": (["--in_mics"], "micrographs STAR (MotionCorr/CtfFind/Select job)"),
    "in_coords": (["--in_coords"], "coordinate list to learn from (reviewed queries, Manual picking job)"),
    "in_parts": (["--in_parts"], "particles STAR: positives (e.g. good 2D classes)"),
    "reviewed": (["--reviewed"], "coordinate list with the reviewed queries (a parameter: editable on Continue)"),
    "in_movies": (["--in_movies"], "ignored"),
    "in_3dref": (["--in_3dref", "--in_3Dref"], "ignored"),
    "in_mask": (["--in_mask"], "ignored"),
    "j": (["--j"], "threads (RELION's 'Number of threads')"),
    "pipeline_control": (["--pipeline_control"], "added by RELION; unused"),
    "diameter": (["--diameter", "--particle_diameter"], "particle diameter in Angstrom"),
    "radius_px": (["--radius_px", "--radius-px"], "particle radius in micrograph pixels (instead of --diameter)"),
    "predict": (["--predict"], "true: final run, picks for all micrographs"),
    "threshold": (["--threshold"], "probability threshold for autopick.star; given -> final run"),
    "model": (["--model"], "model.npz from an earlier job: pick with it, no labels needed"),
    "batch": (["--batch"], "proposals per round (default 10)"),
    "train_micrographs": (["--train_micrographs", "--train-micrographs"], "micrographs to learn on (default 2)"),
    "max_train_micrographs": (["--max_train_micrographs"], "cap when labels come from many micrographs (default 12)"),
    "recipe": (["--recipe"], "engine recipe: default or seed"),
    "seed": (["--seed"], "random seed (default 0)"),
    "relion_version": (["--relion_version"], "4 or 5 (default: from the input STAR's '# version' line)"),
    "feature_model": (["--feature_model", "--feature-model"], f"Topaz backbone, optionally +viewsN (default {DEFAULT_FEATURE_MODEL})"),
    "working_pixel_size": (["--working_pixel_size"], "A/px the features are computed at (default 8)"),
    "pixel_size": (["--pixel_size", "--angpix"], "micrograph pixel size in A, overriding STAR and headers"),
    "device": (["--device"], "torch device: cpu, cuda, cuda:1 (default: cuda when present)"),
    "gpu": (["--gpu"], "GPU id (RELION style): same as --device cuda:<id>"),
    "cache_dir": (["--cache_dir", "--cache-dir"], "feature cache (default: $CRYOAL_CACHE, else <job>/feature_cache)"),
    "cache_all": (["--cache_all"], "true: also cache features of micrographs only predicted (large!)"),
    "threads": (["--threads"], "torch CPU threads (default: --j)"),
    "min_fom": (["--min_fom"], "lowest probability kept in candidates.star (default 0.01)"),
    "overlays": (["--overlays"], "micrographs drawn per round (default 4)"),
    "continue_from": (["--continue_from"], "an earlier job folder of this program to take labels/state from"),
}
_LIST_OPTIONS = {
    "labels": (["--labels"], "STAR files with labels (coordinate list with rlnParticleSelectionType, or a "
                             "table with rlnMicrographName, rlnCoordinateX/Y and a label column)"),
    "negatives": (["--negatives"], "STAR files whose picks are all negatives (junk classes, rejected picks)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RELION's External job arguments, with parse_known_args semantics (unknown args are kept, not fatal)."""
    p.allow_abbrev = False  # '--thresh' must not silently become --threshold
    for dest, (flags, help_) in _VALUE_OPTIONS.items():
        p.add_argument(*flags, dest=dest, nargs="?", const="", default=None, help=help_)
    for dest, (flags, help_) in _LIST_OPTIONS.items():
        p.add_argument(*flags, dest=dest, nargs="*", action="extend", default=None, help=help_)
    p.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    original = p.parse_known_args

    def tolerant(args=None, namespace=None):
        ns, extras = original(args, namespace)
        ns.unknown_args = list(getattr(ns, "unknown_args", None) or []) + list(extras)
        return ns, []

    p.parse_known_args = tolerant  # RELION appends --pipeline_control and free-text "Additional arguments"


def _text(v) -> str | None:
    if v is None:
        return None
    v = str(v).strip()
    return v or None


def _number(name: str, v, kind=float, positive: bool = False):
    v = _text(v)
    if v is None:
        return None
    try:
        x = kind(float(v)) if kind is int else kind(v)
    except (ValueError, OverflowError):  # int(float('inf')) overflows
        raise R.RelionError(f"--{name} {v!r}: expected a finite number") from None
    if not math.isfinite(x):
        raise R.RelionError(f"--{name} {v!r}: expected a finite number")
    if positive and x <= 0:
        raise R.RelionError(f"--{name} {v!r}: must be positive")
    return x


def _boolean(name: str, v) -> bool:
    if v is None:
        return False
    t = str(v).strip().lower()
    if t in TRUE_WORDS:
        return True
    if t in FALSE_WORDS:
        return False
    raise R.RelionError(f"--{name} {v!r}: expected true or false")


def _files(values) -> list[str]:
    out = []
    for v in values or []:
        out += [w for w in str(v).replace(",", " ").split() if w]
    return out


def settings_from_args(args) -> JobSettings:
    """Turn the parsed command line into settings, with errors that name the parameter."""
    from .validate import PIXEL_SIZE_RANGE

    g = lambda k: getattr(args, k, None)  # noqa: E731
    out = _text(g("o"))
    if not out:
        raise R.RelionError("--o is missing: RELION passes the job folder (e.g. --o External/job005/)")
    s = JobSettings(outdir=R.job_dir(out))
    s.in_mics, s.in_coords, s.in_parts = _text(g("in_mics")), _text(g("in_coords")), _text(g("in_parts"))
    s.reviewed = _text(g("reviewed"))
    s.ignored_inputs = {k: _text(g(k)) for k in ("in_movies", "in_3dref", "in_mask") if _text(g(k))}
    s.diameter = _number("diameter", g("diameter"), positive=True)
    s.radius_px = _number("radius_px", g("radius_px"), positive=True)
    s.predict = _boolean("predict", g("predict")) if g("predict") is not None else False
    s.threshold = _number("threshold", g("threshold"))
    if s.threshold is not None and not 0 <= s.threshold <= 1:
        raise R.RelionError(f"--threshold {s.threshold}: a probability between 0 and 1 (the FOM we write)")
    s.model = _text(g("model"))
    for name in ("batch", "train_micrographs", "max_train_micrographs", "seed", "overlays"):
        v = _number(name, g(name), int)
        if v is not None:
            if v < 0 or (v == 0 and name in ("batch", "train_micrographs", "max_train_micrographs")):
                raise R.RelionError(f"--{name} {v}: must be positive")
            setattr(s, name, v)
    s.recipe = _text(g("recipe")) or s.recipe
    s.labels, s.negatives = _files(g("labels")), _files(g("negatives"))
    s.relion_version = _text(g("relion_version"))
    s.feature_model = _text(g("feature_model")) or s.feature_model
    try:
        parse_feature_model(s.feature_model)
    except ValueError as exc:
        raise R.RelionError(f"--feature_model: {exc}") from None
    s.working_pixel_size = _number("working_pixel_size", g("working_pixel_size"), positive=True)
    s.pixel_size = _number("pixel_size", g("pixel_size"), positive=True)
    lo, hi = PIXEL_SIZE_RANGE
    if s.pixel_size is not None and not lo <= s.pixel_size <= hi:
        raise R.RelionError(f"--pixel_size {s.pixel_size:g}: not a plausible pixel size (expected {lo:g} to {hi:g} A/px)")
    s.device = _text(g("device"))
    gpu = _text(g("gpu"))
    if gpu and not s.device:
        s.device = f"cuda:{gpu.split(',')[0]}" if gpu.split(",")[0].isdigit() else "cuda"
    s.cache_dir = _text(g("cache_dir")) or os.environ.get("CRYOAL_CACHE") or str(Path(s.outdir) / "feature_cache")
    s.cache_all = _boolean("cache_all", g("cache_all")) if g("cache_all") is not None else False
    s.threads = _number("threads", g("threads"), int) or _number("j", g("j"), int)
    mf = _number("min_fom", g("min_fom"))
    s.min_fom = 0.01 if mf is None else mf
    s.continue_from = _text(g("continue_from"))
    s.unknown = list(getattr(args, "unknown_args", []) or [])
    return s


# --- logging to run.out / run.err ------------------------------------------------------------
class Log:
    """Progress with elapsed time on stdout (run.out); warnings also on stderr (run.err)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self._seen: set[str] = set()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def warn(self, msg: str) -> None:
        if msg in self._seen:
            return
        self._seen.add(msg)
        self(f"WARNING: {msg}")
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)


# --- the job ----------------------------------------------------------------------------------
class Job:
    """One run in one job folder.  Everything is project-relative (cwd = RELION project folder)."""

    def __init__(self, s: JobSettings, log: Log):
        self.s = s
        self.log = log
        self.out = s.outdir
        self.folder = Path(s.outdir)
        self.timing: dict[str, float] = {}

    # -- helpers ---------------------------------------------------------------------------
    def check(self) -> None:
        R.check_abort(self.out)

    def _timed(self, name: str, t0: float) -> None:
        self.timing[name] = round(self.timing.get(name, 0.0) + time.perf_counter() - t0, 2)

    def radius_of(self, entry: R.MicrographEntry) -> float:
        if self.s.radius_px:
            return float(self.s.radius_px)
        return float(self.diameter) / (2.0 * float(entry.pixel_size))

    def spec(self, entry: R.MicrographEntry):
        from .workflow import MicrographSpec

        return MicrographSpec(str(entry.path), entry.key, self.s.pixel_size or entry.pixel_size,
                              extra={"relion_name": entry.name})

    def engine(self, feature_model: str, cache: bool = True):
        from .workflow import EngineSettings

        return EngineSettings(radius_px=None, diameter_A=None, feature_model=feature_model,
                              working_pixel_size=self.s.working_pixel_size,
                              cache_dir=self.s.cache_dir if cache else None, device=self.s.device)

    # -- inputs ----------------------------------------------------------------------------
    def read_inputs(self) -> None:
        s = self.s
        if not s.in_mics:
            raise R.RelionError("no input micrographs: select the micrographs STAR of a MotionCorr, CtfFind or "
                                "Select job as 'Input micrographs' (--in_mics)")
        self.major, how = R.detect_relion_version(s.in_mics, s.relion_version)
        self.version = R.VERSION_TAG[self.major]
        self.log(f"RELION {self.major} conventions ({how}); node label {R.NODE_LABELS[self.major]['coords']}")
        for k, v in s.ignored_inputs.items():
            self.log(f"note: --{k} {v} is not used by this job")
        if s.unknown:
            self.log(f"note: ignoring arguments this job does not know: {' '.join(s.unknown)}")
        t = time.perf_counter()
        self.table = R.read_micrographs_star(s.in_mics)
        for note in self.table.notes:
            self.log.warn(note)
        self._check_micrographs()
        self.by_key = self.table.by_key()
        self.find = self.table.resolver()
        self._timed("inputs", t)
        self.log(f"{len(self.table.entries)} micrographs in {s.in_mics} (STAR version {self.table.version or 'none'})")

    def _check_micrographs(self) -> None:
        """Every file exists and has a header; pixel sizes agree (before any slow work starts)."""
        from .io import MicrographError

        missing, bad = [], []
        self.shapes: dict[str, tuple[int, int]] = {}  # key -> (ny, nx): labels off a micrograph are refused
        for e in self.table.entries:
            if not e.path.exists():
                missing.append(e)
                continue
            try:
                h = R.read_header(e.path)
            except MicrographError as exc:
                bad.append(str(exc))
                continue
            self.shapes[e.key] = h.shape
            if self.s.pixel_size:
                e.pixel_size, e.pixel_size_source = self.s.pixel_size, "--pixel_size"
                continue
            note = R.check_pixel_size(e, h)
            if note:
                self.log.warn(note)
        if missing:
            shown = ", ".join(f"{e.path} (rlnMicrographName {e.name})" for e in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise R.RelionError(f"{len(missing)} micrograph file(s) listed in {self.s.in_mics} not found: "
                                f"{shown}{more}")
        if bad:
            raise R.RelionError(f"unreadable micrograph(s) listed in {self.s.in_mics}: " + "; ".join(bad[:5]))

    def size_settings(self, model_meta: dict | None = None) -> None:
        s = self.s
        self.diameter = s.diameter
        if not s.diameter and not s.radius_px:
            if model_meta and model_meta.get("diameter_A"):
                self.diameter = float(model_meta["diameter_A"])
                self.log(f"particle diameter {self.diameter:g} A from the model file")
            else:
                raise R.RelionError("no particle size: add the parameter --diameter (in Angstrom), "
                                    "or --radius_px (in micrograph pixels)")

    # -- session ---------------------------------------------------------------------------
    def open_session(self):
        from .session import Session

        src = self.s.continue_from
        here = self.folder / "session.json"
        if not src and self.s.in_coords and not here.exists():
            cand = Path(self.s.in_coords).parent
            if (cand / "session.json").exists() and cand.resolve() != self.folder.resolve():
                src = str(cand)
        if src and not here.exists():
            src_dir = Path(src)
            if not (src_dir / "session.json").exists():
                raise R.RelionError(f"--continue_from {src}: no session.json there (not a job of this program)")
            # session.json last: until it is here, a killed run simply copies again
            for f in sorted((src_dir / "proposals").glob("round_*.tsv")):
                copy_file(f, self.folder / "proposals" / f.name)
            for name in ("labels.tsv", "model.npz", "model.json", "session.json"):
                if (src_dir / name).exists():
                    copy_file(src_dir / name, self.folder / name)
            self.log(f"continuing the session of {src_dir} (labels, round, proposals copied)")
        self.session = Session(self.folder)
        self.rstate = self.session.state.setdefault("relion", {})
        prev = self.rstate.get("in_mics")
        if prev and prev != self.s.in_mics:
            self.log(f"note: input micrographs changed from {prev} to {self.s.in_mics}; labels are kept by "
                     "micrograph name")
        return self.session

    # -- labels in -------------------------------------------------------------------------
    def _labels_from_table(self, df, default_label: int | None, source: str, force: int | None = None):
        from .labels import Label

        out, unknown = [], set()
        rnd = self.session.round
        for r in df.itertuples(index=False):
            e = self.find(r.micrograph)
            if e is None:
                unknown.add(str(r.micrograph))
                continue
            lab = force if force is not None else (int(r.label) if np.isfinite(r.label) else default_label)
            out.append(Label(e.key, float(r.x), float(r.y), int(lab), source, rnd))
        if unknown:
            self.log.warn(f"{source}: {len(unknown)} micrograph(s) not in {self.s.in_mics} were skipped "
                          f"(e.g. {sorted(unknown)[0]})")
        return out

    def _pixel_size_of(self, name: str) -> float | None:
        e = self.find(name)
        return e.pixel_size if e else None

    def _import_review(self, sources: list[str], written: dict, imported: dict, just_imported: dict):
        """Answers from reviewed coordinate files (the rules: cryoal_ext/review.py).

        A file counts only if it changed since we wrote it and was not imported before, so an
        unopened file never turns into labels, in this job or in the job it continues.  A file we
        wrote answers the round that wrote it; any other file answers the latest round.  When
        several sources hold the same micrograph for one round, the newest file wins.  A file that
        is not one of our queries files and keeps none of the proposals shown on its micrograph is
        taken as independent picks (no implicit negatives).
        """
        from .review import Answer, Edited, kept_count

        session = self.session
        found: dict[tuple[int, str], tuple[float, str, Path, str]] = {}
        skipped = 0
        for src in sources:
            for name, f in R.read_coordinate_list(src).items():
                e = self.find(name)
                if e is None:
                    self.log.warn(f"{src}: micrograph {name} is not in {self.s.in_mics}; skipped")
                    continue
                rel, digest = str(f), R.file_digest(f)
                ours = _written_entry(written.get(rel))
                if (ours and ours["digest"] == digest) or imported.get(rel) == digest:
                    skipped += 1
                    continue
                just_imported[rel] = digest
                rnd = ours["round"] if ours and ours["round"] is not None else max(session.round - 1, 0)
                prev = found.get((rnd, e.key))
                if prev is None or f.stat().st_mtime > prev[0]:
                    found[(rnd, e.key)] = (f.stat().st_mtime, name, f, rel)
        if not found:
            self.log(f"review: 0 micrograph(s) edited, {skipped} unchanged or already imported "
                     f"({', '.join(sources)})")
            if session.round > 0 and not self.s.final:
                self.log("note: no reviewed queries found. Open 'queries.star' (Display button), delete what is not "
                         "a particle, add missed ones, save (CTRL+S) in every micrograph, then run again")
            return []
        self.log(f"review: {len(found)} micrograph(s) edited, {skipped} unchanged or already imported "
                 f"({', '.join(sources)})")
        review_dir = self.folder / "rounds" / f"round_{session.round:03d}" / "reviewed"
        answers = []
        for (rnd, key), (_, name, f, rel) in sorted(found.items()):
            copy_file(f, review_dir / (R.mic_root(name) + "_reviewed.star"))  # the evidence, as read
            c = R.read_mic_coordinates(f)
            ed = Edited(c.x, c.y, c.label)
            props = [p for p in session.shown(rnd) if p.micrograph == key] if rnd < session.round else []
            tol = max(1.0, 0.2 * self.radius_of(self.by_key[key]))
            independent = not props or (kept_count(props, ed, tol) == 0 and rel not in written)
            if props and independent:
                self.log(f"note: {f} keeps none of the {len(props)} proposals shown on {name}; taken as independent "
                         "picks (no implicit negatives)")
            answers.append(Answer(rnd, key, ed, str(f), independent=independent,
                                  label_source="relion:picks" if independent else "relion:review"))
        return answers

    def import_labels(self) -> int:
        """Reviewed queries / Manual picking coordinates, particles, label files -> the label store."""
        s = self.s
        session = self.session
        rnd = session.round
        new = []
        # 1. the review of the queries shown (or any picks, in round 0)
        written = self.rstate.get("written_queries", {})
        imported = self.rstate.get("imported", {})
        just_imported: dict[str, str] = {}
        sources = []
        if rnd > 0 and (self.folder / "queries.star").exists():
            sources.append(self.out + "queries.star")  # our queries, edited in place via Display
        for src in (s.reviewed, s.in_coords):
            if src and src not in sources:
                sources.append(src)
        answers = self._import_review(sources, written, imported, just_imported) if sources else []
        # 2. particles (e.g. from good 2D classes) are positives
        if s.in_parts:
            df = R.read_picks_table(s.in_parts, pixel_size_of=self._pixel_size_of)
            lab = self._labels_from_table(df, 1, f"relion:parts:{Path(s.in_parts).name}")
            self.log(f"{len(lab)} positive labels from particles {s.in_parts}")
            new += lab
        # 3. explicit label files, 4. negatives
        for f in s.labels:
            df = R.read_picks_table(f, pixel_size_of=self._pixel_size_of)
            lab = self._labels_from_table(df, 1, f"relion:labels:{Path(f).name}")
            npos = sum(l.label for l in lab)
            self.log(f"{npos} positive, {len(lab) - npos} negative labels from {f}")
            new += lab
        for f in s.negatives:
            df = R.read_picks_table(f, pixel_size_of=self._pixel_size_of)
            lab = self._labels_from_table(df, 0, f"relion:negatives:{Path(f).name}", force=0)
            self.log(f"{len(lab)} negative labels from {f}")
            new += lab
        outcome = apply_answers(session, answers, lambda key: self.radius_of(self.by_key[key]), "relion:review",
                                extra=new, shape_of=lambda key: self.shapes.get(key))
        if outcome.applied or outcome.repeated:
            npos = outcome.positives
            self.log(f"review: {len(outcome.applied)} answer(s) applied -> {npos} positive, "
                     f"{len(outcome.labels) - npos} negative labels"
                     + (f"; {len(outcome.repeated)} applied before, skipped" if outcome.repeated else ""))
        added = outcome.added
        if just_imported:
            imported.update(just_imported)
            self.rstate["imported"] = imported
            session.save_state()
        pos, neg = session.labels.counts()
        self.log(f"labels: +{added} new, {pos} positive and {neg} negative in {session.labels.path}")
        return added

    # -- training set ----------------------------------------------------------------------
    def training_keys(self) -> list[str]:
        from .workflow import choose_training

        keys = [e.key for e in self.table.entries]
        stored = [k for k in self.rstate.get("train", []) if k in self.by_key]
        base = stored or choose_training(keys, self.s.train_micrographs, self.s.seed)
        if stored and len(stored) < self.s.train_micrographs:  # asked for more: add, never drop (labels live there)
            rest = [k for k in keys if k not in stored]
            base = sorted(set(stored) | set(choose_training(rest, self.s.train_micrographs - len(stored), self.s.seed)))
        counts: dict[str, int] = {}
        for l in self.session.labels.effective():
            if l.micrograph in self.by_key:
                counts[l.micrograph] = counts.get(l.micrograph, 0) + 1
        extra = sorted((k for k in counts if k not in base), key=lambda k: (-counts[k], k))
        room = max(self.s.max_train_micrographs - len(base), 0)
        if len(extra) > room:
            self.log(f"note: labels on {len(extra)} more micrographs; learning on the {room} with most labels "
                     f"(--max_train_micrographs {self.s.max_train_micrographs})")
        train = sorted(set(base) | set(extra[:room]))
        self.rstate["train"] = sorted(set(base))
        return train

    # -- outputs ---------------------------------------------------------------------------
    def write_coords(self, names: list[str], picks_of: dict, pickname: str, list_name: str) -> tuple[str, dict]:
        return R.write_coordinates(self.out, names, picks_of, pickname, list_name, self.version)

    def nodes(self) -> list[tuple[str, str]]:
        """Every output this job has on disk, as (node name, kind) for RELION_OUTPUT_NODES.star.

        model.npz is not declared: Display would run relion_display on it (see relion.NODE_LABELS).
        """
        out = []
        for name, kind in (("queries.star", "coords"), ("autopick.star", "coords"), ("candidates.star", "coords"),
                           ("logfile.pdf", "logfile")):
            if (self.folder / name).exists():
                out.append((self.out + name, kind))
        return out

    def plots(self, round_dir: Path, items, picks_by_key: dict, proposals, threshold: float,
              scores: np.ndarray, summary: dict) -> list[Path]:
        from .plots import plot_histogram, plot_overlay

        pngs = []
        labels = self.session.labels.effective()
        for it in items[: max(self.s.overlays, 0)]:
            key = it.mic.name
            fr = it.mic.frame
            pk = picks_by_key.get(key)
            q = [p for p in proposals if p.micrograph == key]
            path = round_dir / f"overlay_{key}.png"
            plot_overlay(it.mic.image, str(path),
                         picks=(pk.x, pk.y) if pk is not None else None,
                         queries=(np.array([p.x for p in q]), np.array([p.y for p in q])) if q else None,
                         labels=[(l.x, l.y, l.label) for l in labels if l.micrograph == key],
                         radius=fr.radius_to_working(self.radius_of(self.by_key[key])),
                         title=f"{self.by_key[key].name}: {len(pk) if pk is not None else 0} picks "
                               f"(FOM > {threshold:g}, blue), {len(q)} queries (yellow), labels +/x",
                         scale=(fr.scale_x, fr.scale_y))
            pngs.append(path)
        hist = round_dir / "scores.png"
        plot_histogram(scores, str(hist), threshold, title=f"pick probabilities ({scores.size} candidates)")
        pngs.append(hist)
        write_summary_pdf(self.folder / "logfile.pdf", summary, pngs)
        return pngs

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        self.read_inputs()
        model_meta = None
        if s.model:
            from .model import BLR

            try:
                self.given_model = BLR.load(s.model)
            except (FileNotFoundError, ValueError) as exc:
                raise R.RelionError(f"--model {s.model}: {exc}") from exc
            model_meta = self.given_model.meta
        self.size_settings(model_meta)
        if s.working_pixel_size is None:  # features must be computed at the scale the model was fitted at
            wps = (model_meta or {}).get("working_pixel_size")
            s.working_pixel_size = round(float(wps), 2) if wps else 8.0
        self.open_session()
        self.rstate["in_mics"] = s.in_mics
        self.import_labels()
        self.check()
        if s.threads:
            import torch

            torch.set_num_threads(max(int(s.threads), 1))
        summary = self.predict_all() if s.final else self.labelling_round()
        summary["timing_s"] = self.timing
        write_json(self.folder / "summary.json", summary)
        nodes_path = R.write_output_nodes(self.out, self.nodes(), self.major)
        self.log(f"output nodes -> {nodes_path}")
        return summary

    def _featurise(self, keys: list[str], feature_model: str, cache: bool = True):
        from .workflow import featurise

        entries = [self.by_key[k] for k in keys]
        return featurise([self.spec(e) for e in entries], self.engine(feature_model, cache),
                         progress=self.log, check=self.check)

    def _radius_for_training(self, train: list[str]) -> float:
        ps = np.array([self.s.pixel_size or self.by_key[k].pixel_size for k in train], float)
        if ps.size and (ps.max() - ps.min()) / ps.min() > 0.02:
            self.log.warn(f"training micrographs have different pixel sizes ({ps.min():g}-{ps.max():g} A); "
                          "the particle radius of the first is used for learning")
        return self.radius_of(self.by_key[train[0]])

    def labelling_round(self) -> dict:
        from .extract import Picks
        from .recipes import get_recipe
        from .workflow import labelling_round, predict, suggest_threshold

        s, session = self.s, self.session
        rnd = session.round
        for msg in session.note_settings({"recipe": s.recipe, "feature_model": s.feature_model,
                                          "working_pixel_size": s.working_pixel_size}):
            self.log.warn(msg)
        train = self.training_keys()
        self.log(f"round {rnd}: learning on {len(train)} micrograph(s): {', '.join(train)}")
        t = time.perf_counter()
        items = list(self._featurise(train, s.feature_model))
        self._timed("features", t)
        self.check()
        radius = self._radius_for_training(train)
        t = time.perf_counter()
        res = labelling_round(session, items, get_recipe(s.recipe), radius, s.batch, s.feature_model, s.seed)
        if res.model is not None:
            res.model.save(session.model_path, round=rnd, n_labels=res.n_labels, diameter_A=self.diameter,
                           radius_px=radius)
        self._timed("fit_and_propose", t)
        self.log(f"fit {res.fit_s:.1f} s on {res.n_labels} labels ({res.n_positive} positive); "
                 f"{len(res.proposals)} queries in {res.propose_s:.1f} s")
        t = time.perf_counter()
        all_picks = {it.mic.name: pk for it, pk in
                     predict(items, res.model, lambda it: self.radius_of(self.by_key[it.mic.name]))}
        scores = np.concatenate([p.score for p in all_picks.values()]) if all_picks else np.empty(0)
        fom_thr = R.extract_threshold(scores, suggest_threshold(scores))
        thr = fom_thr.value
        picks = {k: R.keep_for_extract(p, thr) for k, p in all_picks.items()}
        queries = {}
        for k in train:
            q = [p for p in res.proposals if p.micrograph == k]
            queries[self.by_key[k].name] = Picks(k, np.array([p.x for p in q], float),
                                                 np.array([p.y for p in q], float),
                                                 np.array([p.score for p in q], float))
        self.check()
        names = [self.by_key[k].name for k in train]
        qlist, qfiles = self.write_coords(names, queries, "queries", "queries.star")
        plist, _ = self.write_coords(names, {self.by_key[k].name: p for k, p in picks.items()}, "autopick",
                                     "autopick.star")
        round_dir = self.folder / "rounds" / f"round_{rnd:03d}"
        for name, f in qfiles.items():  # our own copy: Display / Manual picking edit these files in place
            copy_file(f, round_dir / "queries" / (R.mic_root(name) + "_queries.star"))
        written = self.rstate.setdefault("written_queries", {})  # every file we ever wrote: unopened = ours
        written.update({f: {"digest": R.file_digest(f), "round": rnd} for f in qfiles.values()})
        self._timed("write", t)
        n_picks = int(sum(len(p) for p in picks.values()))
        pos, neg = session.labels.counts()
        summary = {"mode": "round", "round": rnd, "relion_version": self.major, "train": train,
                   "labels": {"positive": pos, "negative": neg}, "queries": len(res.proposals),
                   "queries_file": qlist, "picks_file": plist, "suggested_threshold": thr,
                   "picks_on_training_micrographs": n_picks, "model": str(session.model_path) if res.model else None}
        t = time.perf_counter()
        try:
            self.plots(round_dir, items, picks, res.proposals, thr, scores, summary)
        except Exception as exc:  # a picture must never cost the user a round
            self.log.warn(f"plots not written ({exc})")
        self._timed("plots", t)
        session.record(round=rnd, mode="relion-round", labels=res.n_labels, positives=res.n_positive, train=train,
                       queries=len(res.proposals), threshold=thr, fit_s=round(res.fit_s, 2),
                       propose_s=round(res.propose_s, 2), time=time.time())
        session.save_state(round=rnd + 1)
        self.log(f"round {rnd} done: {len(res.proposals)} queries -> {qlist}; {n_picks} picks with FOM > "
                 f"{fom_thr.text} (suggested threshold) -> {plist}")
        self.log("next: Display 'queries.star', delete non-particles, add missed ones (CTRL+1 + click: a red "
                 "negative), save with CTRL+S, then run this job again; --predict true for the final picks")
        return summary

    def predict_all(self) -> dict:
        from .learner import ActiveLearner
        from .recipes import get_recipe
        from .workflow import predict, suggest_threshold

        s, session = self.s, self.session
        rnd = session.round
        keys = [e.key for e in self.table.entries]
        t = time.perf_counter()
        items = []
        if s.model:
            model = self.given_model
            feature_model = model.meta.get("feature_model", s.feature_model)
            for ext in (".npz", ".json"):
                src, dst = Path(s.model).with_suffix(ext), self.folder / f"model{ext}"
                if not dst.exists() or not os.path.samefile(src, dst):
                    shutil.copy2(src, dst)
            train: list[str] = []
            self.log(f"final run with the model {s.model} (feature model {feature_model}); no fitting")
        else:
            feature_model = s.feature_model
            train = self.training_keys()
            self.log(f"final run: fitting on {len(train)} micrograph(s) with {len(session.labels.effective())} labels")
            items = list(self._featurise(train, feature_model))
            self._timed("features", t)
            t = time.perf_counter()
            learner = ActiveLearner(items, self._radius_for_training(train), get_recipe(s.recipe), feature_model,
                                    seed=s.seed)
            model = learner.fit(session.labels.effective())
            model.save(session.model_path, round=rnd, n_labels=len(session.labels.effective()),
                       diameter_A=self.diameter, radius_px=learner.radius_px)
            self._timed("fit", t)
            self.log(f"model -> {session.model_path} (+ .json); reuse it with --model {session.model_path}")
        t = time.perf_counter()
        radius = lambda it: self.radius_of(self.by_key[it.mic.name])  # noqa: E731
        all_picks: dict[str, object] = {}
        done = 0
        for it, pk in predict(items, model, radius):
            all_picks[it.mic.name] = pk
        rest = [k for k in keys if k not in all_picks]
        t_pred = time.perf_counter()
        for it, pk in predict(self._featurise(rest, feature_model, cache=s.cache_all), model, radius):
            all_picks[it.mic.name] = pk
            done += 1
            if len(items) < max(s.overlays, 0):
                items.append(it)  # kept only for the pictures
        self._timed("predict", t)
        if done:
            self.log(f"predicted {done} micrograph(s) in {time.perf_counter() - t_pred:.1f} s")
        self.check()
        scores = np.concatenate([p.score for p in all_picks.values()]) if all_picks else np.empty(0)
        optimum = suggest_threshold(scores)
        suggested = R.extract_threshold(scores, optimum)  # what Extract on candidates.star needs
        thr = s.threshold if s.threshold is not None else suggested.value
        thr_text = f"{s.threshold:g}" if s.threshold is not None else suggested.text
        t = time.perf_counter()
        names = [e.name for e in self.table.entries]
        by_name = {self.by_key[k].name: p for k, p in all_picks.items()}
        # autopick.star: exactly what Extract keeps from candidates.star at thr (FOM > thr)
        plist, _ = self.write_coords(names, {n: R.keep_for_extract(p, thr) for n, p in by_name.items()}, "autopick",
                                     "autopick.star")
        floor = min(s.min_fom, thr)  # candidates always hold every pick of autopick.star
        clist, _ = self.write_coords(names, {n: p.above(floor) for n, p in by_name.items()}, "candidates",
                                     "candidates.star")
        self._timed("write", t)
        n_picks = int(R.extract_keeps(R.written_fom(scores), thr).sum())
        pos, neg = session.labels.counts()
        summary = {"mode": "predict", "round": rnd, "relion_version": self.major, "micrographs": len(names),
                   "labels": {"positive": pos, "negative": neg}, "threshold": float(thr),
                   "suggested_threshold": suggested.value, "picks": n_picks,
                   "candidates": int((scores >= floor).sum()), "picks_file": plist, "candidates_file": clist,
                   "model": str(self.folder / "model.npz")}
        write_json(self.folder / "threshold.json",
                   {"suggested_threshold": suggested.value, "suggested_threshold_text": suggested.text,
                    "threshold_used": float(thr), "max_expected_f1_probability": float(optimum),
                    "rule": "autopick.star holds the picks with FOM > threshold_used, as RELION's Extract keeps "
                            "them; Extract on candidates.star with 'Minimum autopick FOM' = suggested_threshold_text "
                            "keeps exactly the picks autopick.star has at the suggested threshold"})
        t = time.perf_counter()
        try:
            by_key = {k: R.keep_for_extract(p, thr) for k, p in all_picks.items()}
            self.plots(self.folder / "rounds" / f"final_{rnd:03d}", items, by_key, [], thr, scores, summary)
        except Exception as exc:
            self.log.warn(f"plots not written ({exc})")
        self._timed("plots", t)
        session.record(round=rnd, mode="relion-predict", micrographs=len(names), threshold=float(thr),
                       suggested=suggested.value, picks=n_picks, time=time.time())
        self.log(f"final picks: {n_picks} on {len(names)} micrographs with FOM > {thr_text} -> {plist}; "
                 f"all {summary['candidates']} candidates with FOM >= {floor:g} -> {clist}")
        self.log(f"suggested FOM threshold for Extract: {suggested.text} (Particle extraction on {clist} with "
                 f"'Minimum autopick FOM' {suggested.text} keeps exactly the picks autopick.star has at it; "
                 "RELION keeps FOM > threshold)")
        return summary


def _written_entry(entry) -> dict | None:
    """A ``written_queries`` record: {"digest", "round"} (a bare digest in sessions made before rounds were kept)."""
    if entry is None:
        return None
    return entry if isinstance(entry, dict) else {"digest": entry, "round": None}


def write_summary_pdf(path: Path, summary: dict, pngs: list[Path]) -> None:
    """A small PDF for RELION's 'logfile.pdf' node: a text page and the round's pictures."""
    from .atomic import atomic_path
    from .plots import _plt

    plt = _plt()
    from matplotlib.backends.backend_pdf import PdfPages

    lines = [f"cryoal_ext RELION job: {summary.get('mode')} (round {summary.get('round')})", ""]
    for k, v in summary.items():
        if k not in ("mode",):
            lines.append(f"{k}: {v}")
    with atomic_path(path) as tmp:
        with PdfPages(tmp) as pdf:
            fig = plt.figure(figsize=(8.27, 11.69))
            fig.text(0.06, 0.95, "\n".join(lines), va="top", family="monospace", fontsize=9, wrap=True)
            pdf.savefig(fig)
            plt.close(fig)
            for png in pngs:
                if not Path(png).exists():
                    continue
                fig, ax = plt.subplots(figsize=(8.27, 8.27))
                ax.imshow(plt.imread(str(png)))
                ax.set_axis_off()
                pdf.savefig(fig)
                plt.close(fig)


# --- entry points ------------------------------------------------------------------------------
def main(args) -> int:
    """Run one job; RELION only looks at the exit marker files, the exit code is for humans."""
    log = Log()
    try:
        s = settings_from_args(args)
    except R.RelionError as exc:
        out = _text(getattr(args, "o", None))
        print(f"{JOB_PREFIX}: error: {exc}", file=sys.stderr, flush=True)
        if out:
            _fail_marker(out)
        return 1
    Path(s.outdir).mkdir(parents=True, exist_ok=True)
    try:
        lock = _acquire(s.outdir)
    except LockedError as exc:
        # The folder belongs to the run that holds the lock: its markers are not ours to write.
        print(f"{JOB_PREFIX}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        print(f"{JOB_PREFIX}: error: cannot lock the job folder {s.outdir}: {exc}", file=sys.stderr, flush=True)
        _fail_marker(s.outdir)
        return 1
    try:
        _mark_new_run(s.outdir)
        R.clear_exit_markers(s.outdir)
        log(f"cryoal_ext RELION External job in {s.outdir} (pid {os.getpid()}, cwd {os.getcwd()})")
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, *a, **k: log.warn(str(m))
            Job(s, log).run()
        R.write_marker(s.outdir, R.SUCCESS)  # last: RELION reads the nodes as soon as it sees this
        R.signal_pipeline_changed()  # an open RELION GUI shows the job finished without a click
        log(f"done in {time.perf_counter() - log.t0:.1f} s")
        return 0
    except R.JobAborted:
        R.finish_aborted(s.outdir)
        R.signal_pipeline_changed()
        log("aborted on request (RELION_JOB_ABORT_NOW); labels given so far are kept")
        print(f"{JOB_PREFIX}: aborted by the user", file=sys.stderr, flush=True)
        return 1
    except BaseException as exc:  # noqa: BLE001 - any failure must leave RELION a FAILURE marker
        _fail_marker(s.outdir)
        expected = isinstance(exc, (R.RelionError, ValueError, FileNotFoundError, RuntimeError))
        if isinstance(exc, KeyboardInterrupt):
            msg = "interrupted"
        else:
            msg = f"{type(exc).__name__}: {exc}" if not expected else str(exc)
        if getattr(args, "debug", False) or not expected:
            traceback.print_exc(file=sys.stderr)
        print(f"{JOB_PREFIX}: error: {msg}", file=sys.stderr, flush=True)
        kept = Path(s.outdir) / "labels.tsv"
        log(f"FAILED: {msg}" + (f" (labels given so far are kept in {kept})" if kept.exists() else ""))
        return 1
    finally:
        lock.__exit__(None, None, None)


def _acquire(outdir: str):
    """The job-folder lock, waiting a moment (CRYOAL_LOCK_WAIT s, default 3) for a run that is just
    finishing: RELION may start the next run as soon as it sees RELION_JOB_EXIT_SUCCESS."""
    deadline = time.monotonic() + float(os.environ.get("CRYOAL_LOCK_WAIT", "3"))
    while True:
        lock = folder_lock(outdir)
        try:
            lock.__enter__()
            return lock
        except LockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _fail_marker(outdir: str) -> None:
    try:
        R.write_marker(outdir, R.FAILURE)
    except OSError as exc:
        print(f"{JOB_PREFIX}: could not write {R.FAILURE} in {outdir}: {exc}", file=sys.stderr, flush=True)
        return
    R.signal_pipeline_changed()


def _mark_new_run(outdir: str) -> None:
    """RELION appends to run.err: say where this run's messages begin, so an earlier run's last
    words ("aborted by the user", an error) are not read as this run's."""
    err = Path(outdir) / "run.err"
    try:
        earlier = err.stat().st_size > 0
    except OSError:
        earlier = False
    if earlier:
        print(f"{JOB_PREFIX}: new run started {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()}); "
              "the lines above are from earlier runs", file=sys.stderr, flush=True)


def build_parser(prog: str = "cryoal_relion.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").strip().splitlines()[0], allow_abbrev=False)
    add_arguments(p)
    return p


def run_cli(argv: list[str] | None = None, prog: str = "cryoal_relion.py") -> int:
    """What relion_scripts/cryoal_relion.py calls."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    args = build_parser(prog).parse_args(argv)
    return main(args)


if __name__ == "__main__":
    sys.exit(run_cli())
