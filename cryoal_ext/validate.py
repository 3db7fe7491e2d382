"""Checks of user input made before any slow work: option values, micrograph and particle sizes, memory, folders.

Why one module: every front end (the plain commands, cryoSPARC, RELION) must refuse the same bad
input with the same message, naming the option or the file, before a label is stored, a folder
is created or a feature is computed.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

PIXEL_SIZE_RANGE = (0.1, 50.0)  # A/px: anything outside is a header or typing error, not a micrograph
MIN_DIAMETERS = 2  # a micrograph's shorter side must hold at least this many particle diameters
FEATURE_CHANNELS = 128  # the widest Topaz pretrained feature map
# peak bytes per float32 feature value while features are computed (measured with ru_maxrss on a
# 600 x 600 image: 2.9x for one view, 4.9x for 8 views: network activations + the views' running mean)
PEAK_FACTOR = {1: 3.0, "views": 5.0}


class InputError(ValueError):
    """Bad input found before any work: the message names the option or the file."""


# --- option values (argparse ``type=`` functions; argparse puts the option name in front) -------------
def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_number(text: str) -> float:
    """A finite number > 0 (a diameter, radius, pixel size)."""
    v = _float(text)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def non_negative_number(text: str) -> float:
    """A finite number >= 0 (a border width)."""
    v = _float(text)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def finite_number(text: str) -> float:
    v = _float(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def probability(text: str) -> float:
    """A threshold on the probabilities we write: 0 <= p <= 1."""
    v = _float(text)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return v


def pixel_size(text: str) -> float:
    """A pixel size in A inside PIXEL_SIZE_RANGE."""
    v = positive_number(text)
    lo, hi = PIXEL_SIZE_RANGE
    if not lo <= v <= hi:
        raise argparse.ArgumentTypeError(f"{text!r} A/px is not a plausible pixel size (expected {lo:g} to {hi:g} A/px)")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return v


# --- pixel sizes ---------------------------------------------------------------------------------
def check_pixel_size(value: float | None, where: str, fix: str = "give it with --pixel-size") -> float:
    """``value`` (A/px) from ``where`` (a file's header, a STAR or .cs field): refuse missing, negative, absurd."""
    if value is None or value == 0 or (isinstance(value, float) and math.isnan(value)):
        raise InputError(f"{where}: no pixel size; {fix}")
    if not math.isfinite(value):
        raise InputError(f"{where}: pixel size {value} is not a number; {fix}")
    if value < 0:
        raise InputError(f"{where}: pixel size is negative ({value:g} A/px); {fix}")
    lo, hi = PIXEL_SIZE_RANGE
    if not lo <= value <= hi:
        raise InputError(f"{where}: pixel size {value:g} A/px is outside the plausible {lo:g}-{hi:g} A/px; {fix}")
    return float(value)


# --- micrograph and particle sizes, memory -------------------------------------------------------
@dataclass(frozen=True)
class Header:
    """Shape (ny, nx) and raw header pixel size (0 when unset, negative kept as it is)."""

    shape: tuple[int, int]
    pixel_size: float


def read_header(path: str | os.PathLike) -> Header | None:
    """The MRC header only (cheap); None when the file cannot be read (reading it later says why)."""
    import mrcfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(str(path), mode="r", header_only=True, permissive=True) as mrc:
                h = mrc.header
                return Header((int(h.ny), int(h.nx)), float(mrc.voxel_size.x))
    except Exception:  # noqa: BLE001 - a missing or corrupt file is reported where it is read
        return None


def available_memory() -> int | None:
    """Bytes this process could still allocate (Linux MemAvailable, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def feature_bytes(working_shape: tuple[int, int], views: int = 1, batch: int = 1) -> int:
    """Peak memory (bytes) to compute the features of ``batch`` working images of ``working_shape``."""
    ny, nx = working_shape
    factor = PEAK_FACTOR[1] if views <= 1 else PEAK_FACTOR["views"]
    return int(ny * nx * FEATURE_CHANNELS * 4 * factor * max(int(batch), 1))


@dataclass(frozen=True)
class SizeRules:
    """What the particle size and engine say, for checking micrographs before they are read."""

    radius_px: float | None = None  # particle radius in original pixels
    diameter_A: float | None = None  # or a diameter in A, converted with each micrograph's pixel size
    working_pixel_size: float = 8.0
    feature_model: str = "resnet16_u32"
    batch: int = 1
    radius_option: str = "--radius-px"
    diameter_option: str = "--diameter-A"
    pixel_size_option: str = "--pixel-size"


def check_micrograph(path: str, shape: tuple[int, int], ps: float, rules: SizeRules,
                     memory: int | None = None) -> None:
    """Refuse a particle that does not fit the micrograph, or a working image that does not fit in memory."""
    from .coords import working_shape
    from .features import parse_feature_model

    ny, nx = shape
    if rules.radius_px or rules.diameter_A:
        d_px = 2.0 * float(rules.radius_px) if rules.radius_px else float(rules.diameter_A) / ps
        given = (f"{rules.radius_option} {rules.radius_px:g}" if rules.radius_px
                 else f"{rules.diameter_option} {rules.diameter_A:g} at {ps:g} A/px")
        if MIN_DIAMETERS * d_px > min(ny, nx):
            what = "larger than the micrograph" if d_px > min(ny, nx) else \
                f"too large: the micrograph holds fewer than {MIN_DIAMETERS} particle diameters across"
            raise InputError(f"{path}: the particle diameter is {d_px:.4g} px ({given}), {what} "
                             f"({nx} x {ny} px); check the particle size and the pixel size")
    wshape = working_shape(shape, ps, rules.working_pixel_size)
    need = feature_bytes(wshape, parse_feature_model(rules.feature_model)[1], rules.batch)
    memory = available_memory() if memory is None else memory
    if memory is not None and need > memory:
        raise InputError(f"{path}: its working image ({wshape[1]} x {wshape[0]} px at "
                         f"{max(rules.working_pixel_size, ps):g} A/px, from {nx} x {ny} px at {ps:g} A/px) needs about "
                         f"{need / 2**30:.1f} GiB to compute features, more than the {memory / 2**30:.1f} GiB "
                         "available; raise --working-pixel-size")


def check_micrograph_files(files: Iterable[str | os.PathLike], given_pixel_size: float | None, rules: SizeRules,
                           pixel_size_of: Callable[[str], float | None] | None = None,
                           skip_bad_pixel_size: bool = False) -> int:
    """Headers of ``files`` against ``rules`` before any slow work; returns how many were checked.

    ``pixel_size_of``: a host's own pixel size per file (a STAR or .cs value) used before the header.
    Unreadable files are left to the reader, which names them; so are files with a bad header pixel size when
    ``skip_bad_pixel_size`` (prediction records them per micrograph and goes on with the rest).  Identical (shape, pixel size) pairs are
    checked once, so thousands of micrographs cost one header read each.
    """
    seen: set[tuple] = set()
    memory = available_memory()
    n = 0
    for f in files:
        f = str(f)
        h = read_header(f)
        if h is None:
            continue
        n += 1
        if given_pixel_size:
            ps = float(given_pixel_size)
        else:
            host = pixel_size_of(f) if pixel_size_of else None
            try:
                ps = check_pixel_size(host if host else h.pixel_size, f if host else f"{f} (MRC header)",
                                      f"give it with {rules.pixel_size_option}")
            except InputError:
                if skip_bad_pixel_size:
                    continue
                raise
        key = (h.shape, ps)
        if key in seen:
            continue
        seen.add(key)
        check_micrograph(f, h.shape, ps, rules, memory)
    return n


# --- folders -------------------------------------------------------------------------------------
def check_writable(folder: str | os.PathLike | None, what: str) -> None:
    """Refuse a folder (or the nearest existing parent of one still to be made) we could not write into.

    Uses the effective user's permissions, as the writes will.
    """
    if folder is None:
        return
    p = Path(folder).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{what} {folder}: {probe} is a file, not a folder")
    eff = os.access in os.supports_effective_ids
    ok = os.access(probe, os.W_OK | os.X_OK, effective_ids=eff) if eff else os.access(probe, os.W_OK | os.X_OK)
    if not ok:
        where = "" if probe == p else f" (its parent {probe} cannot hold new folders)"
        raise InputError(f"{what} {folder} is not writable{where}: permission denied; "
                         "fix its permissions or choose another folder")
