"""The RELION job's settings: the options RELION (or the user) may pass, parsed into JobSettings.

Every value is checked here, so a bad parameter fails before any work with a message naming the
option; unknown options RELION adds are kept, not fatal.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..features import DEFAULT_FEATURE_MODEL, parse_feature_model
from ..recipes import Recipe, offered_in, recipe_for
from .star import RelionError, job_dir


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
    audits: int | None = None  # questions of each batch about the model's own picks (None: the recipe's)
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

    def engine_recipe(self) -> Recipe:
        return recipe_for(self.recipe, self.audits, self.batch)


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
    "recipe": (["--recipe"], "engine recipe: default, seed, head or evidence"),
    "audits": (["--audits"], "questions of each batch about the model's own picks, from 50 answers on "
                             "(default: the recipe's, 3 for default; 0: none; 6 measured no better)"),
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
        raise RelionError(f"--{name} {v!r}: expected a finite number") from None
    if not math.isfinite(x):
        raise RelionError(f"--{name} {v!r}: expected a finite number")
    if positive and x <= 0:
        raise RelionError(f"--{name} {v!r}: must be positive")
    return x


def _boolean(name: str, v) -> bool:
    if v is None:
        return False
    t = str(v).strip().lower()
    if t in TRUE_WORDS:
        return True
    if t in FALSE_WORDS:
        return False
    raise RelionError(f"--{name} {v!r}: expected true or false")


def _files(values) -> list[str]:
    out = []
    for v in values or []:
        out += [w for w in str(v).replace(",", " ").split() if w]
    return out


def settings_from_args(args) -> JobSettings:
    """Turn the parsed command line into settings, with errors that name the parameter."""
    from ..validate import PIXEL_SIZE_RANGE

    g = lambda k: getattr(args, k, None)  # noqa: E731
    out = _text(g("o"))
    if not out:
        raise RelionError("--o is missing: RELION passes the job folder (e.g. --o External/job005/)")
    s = JobSettings(outdir=job_dir(out))
    s.in_mics, s.in_coords, s.in_parts = _text(g("in_mics")), _text(g("in_coords")), _text(g("in_parts"))
    s.reviewed = _text(g("reviewed"))
    s.ignored_inputs = {k: _text(g(k)) for k in ("in_movies", "in_3dref", "in_mask") if _text(g(k))}
    s.diameter = _number("diameter", g("diameter"), positive=True)
    s.radius_px = _number("radius_px", g("radius_px"), positive=True)
    s.predict = _boolean("predict", g("predict")) if g("predict") is not None else False
    s.threshold = _number("threshold", g("threshold"))
    if s.threshold is not None and not 0 <= s.threshold <= 1:
        raise RelionError(f"--threshold {s.threshold}: a probability between 0 and 1 (the FOM we write)")
    s.model = _text(g("model"))
    for name in ("batch", "train_micrographs", "max_train_micrographs", "seed", "overlays"):
        v = _number(name, g(name), int)
        if v is not None:
            if v < 0 or (v == 0 and name in ("batch", "train_micrographs", "max_train_micrographs")):
                raise RelionError(f"--{name} {v}: must be positive")
            setattr(s, name, v)
    s.recipe = _text(g("recipe")) or s.recipe
    try:
        offered_in(s.recipe, "the RELION job")
    except ValueError as exc:
        raise RelionError(f"--recipe: {exc}") from None
    s.audits = _number("audits", g("audits"), int)
    try:
        s.engine_recipe()
    except ValueError as exc:
        raise RelionError(str(exc)) from None
    s.labels, s.negatives = _files(g("labels")), _files(g("negatives"))
    s.relion_version = _text(g("relion_version"))
    s.feature_model = _text(g("feature_model")) or s.feature_model
    try:
        parse_feature_model(s.feature_model)
    except ValueError as exc:
        raise RelionError(f"--feature_model: {exc}") from None
    s.working_pixel_size = _number("working_pixel_size", g("working_pixel_size"), positive=True)
    s.pixel_size = _number("pixel_size", g("pixel_size"), positive=True)
    lo, hi = PIXEL_SIZE_RANGE
    if s.pixel_size is not None and not lo <= s.pixel_size <= hi:
        raise RelionError(f"--pixel_size {s.pixel_size:g}: not a plausible pixel size (expected {lo:g} to {hi:g} A/px)")
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
