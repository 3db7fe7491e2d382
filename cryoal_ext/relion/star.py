"""RELION file conventions (RELION 4.0 and 5.0; reads 3.0/3.1 inputs).  No engine logic here.

Everything RELION-specific that is not "how to pick" lives in this module: reading micrograph and
coordinate STAR files, the pixel-size fallback chain, version detection and node type labels,
where per-micrograph coordinate files go, and the exit-marker protocol.  The facts come from
RELION's sources (see ``../shared/docs/integration-conventions.md``); where RELION's docs and
sources disagree, the sources win (e.g. RELION 4/5 read the STRING node type label, not the old
integer type).  All STAR I/O goes through ``starfile``; every write is atomic.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import starfile

from .atomic import write_text
from .files import picks_frame, write_star

# --- versions and node type labels -----------------------------------------------------------
VERSION_TAG = {4: 30001, 5: 50001}  # the "# version" line RELION 3.1/4.0 and 5.0 write

#: Node type labels per RELION major version.  RELION does not convert labels read from an
#: External job's RELION_OUTPUT_NODES.star, and the GUI lists a node only under its own top-level
#: name, so a RELION-4 label is invisible in RELION 5 and vice versa.
#:
#: The model (model.npz) is deliberately not a node: the GUI's Display button runs
#: ``relion_display --gui --i <file>`` for every node type it has no viewer for (it knows only
#: coordinates, PDF logs, tomography sets and polishing parameters), and relion_display cannot
#: read a model ("Invalid Spider file").  No RELION job takes such a node as input, so declaring
#: it bought nothing but a broken Display entry.
NODE_LABELS = {
    4: {"coords": "MicrographsCoords.star.relion.autopick",
        "mics": "MicrographsData.star.relion",
        "logfile": "LogFile.pdf.relion"},
    5: {"coords": "MicrographCoordsGroup.star.relion.autopick",
        "mics": "MicrographGroupMetadata.star.relion",
        "logfile": "LogFile.pdf.relion"},
}

# --- exit markers (RELION ignores the exit code and polls for these files) --------------------
SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
#: Created by every pipeline write; the GUI's refresh timer looks for finished jobs only while it
#: exists (RELION 4.0 and 5.0 gui_mainwindow.cpp, Gui_Timer_CB), and removes it afterwards.
PIPELINE_HAS_CHANGED = ".pipeline_has_changed"

# rlnParticleSelectionType as the picker colours it: 1 red (CTRL+1), 2 green (default), 3-6 others.
NEGATIVE_SELECTION_TYPE = 1
POSITIVE_SELECTION_TYPE = 2


class RelionError(ValueError):
    """A RELION input that cannot be used; the message names the file and the problem."""


class JobAborted(Exception):
    """The user asked RELION to abort the job (RELION_JOB_ABORT_NOW appeared)."""


# --- STAR reading ----------------------------------------------------------------------------
def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame | dict]:
    """All data blocks of a STAR file (``starfile``), with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise RelionError(f"STAR file not found: {path}")
    try:
        data = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors
        raise RelionError(f"{path}: not a readable STAR file ({exc})") from exc
    if not data:
        raise RelionError(f"{path}: no data blocks (empty or not a STAR file)")
    return data


def star_version(path: str | os.PathLike) -> int | None:
    """The number on the first ``# version NNNNN`` line of a STAR file (None when there is none)."""
    try:
        with open(path, "r", errors="replace") as f:
            for i, line in enumerate(f):
                m = re.match(r"\s*#\s*version\s+(\d+)", line)
                if m:
                    return int(m.group(1))
                if i > 200 and line.strip().startswith("_"):
                    break  # well into a table; RELION writes the line before each block
    except OSError:
        return None
    return None


def major_of(version_tag: int | None) -> int | None:
    """RELION major version from a STAR version tag: 50001 -> 5, 30001 -> 4 (3.1 reads as 4)."""
    if version_tag is None:
        return None
    if version_tag >= 50000:
        return 5
    if version_tag >= 30001:
        return 4
    return None  # 30000: RELION 3.0-style file, says nothing about the running RELION


def detect_relion_version(in_star: str | os.PathLike | None, override: str | int | None = None,
                          project_dir: str | os.PathLike = ".") -> tuple[int, str]:
    """(major version, how it was decided): override, the input STAR's version line,
    ``default_pipeline.star``, else 5 (the current release)."""
    if override not in (None, "", "auto"):
        text = re.sub(r"^relion[-_ ]*", "", str(override).strip().lower())
        try:
            major = int(float(text))
        except ValueError:
            raise RelionError(f"--relion_version {override!r}: give 4 or 5") from None
        if major == 3:
            major = 4  # 3.1 files carry the same tag as 4.0; node labels of 4.0 are the closest
        if major not in NODE_LABELS:
            raise RelionError(f"--relion_version {override!r}: give 4 or 5")
        return major, f"--relion_version {override}"
    for candidate in (in_star, Path(project_dir) / "default_pipeline.star"):
        if candidate and Path(candidate).exists():
            tag = star_version(candidate)
            major = major_of(tag)
            if major:
                return major, f"'# version {tag}' in {candidate}"
    return 5, "no version line found; assuming RELION 5 (set --relion_version 4 for RELION 4)"


# --- micrographs STAR --------------------------------------------------------------------------
@dataclass
class MicrographEntry:
    """One row of a micrographs STAR: the name exactly as RELION wrote it and where the file is."""

    name: str  # rlnMicrographName, verbatim (coordinate lists must repeat it exactly)
    path: Path  # the file, resolved against the project folder
    key: str  # short unique name used in our label/proposal files and the feature cache
    pixel_size: float | None  # Angstrom per pixel of this micrograph file
    pixel_size_source: str
    optics_group: int | None = None


@dataclass
class MicrographTable:
    path: Path
    version: int | None
    entries: list[MicrographEntry]
    notes: list[str] = field(default_factory=list)  # warnings worth showing in run.out

    def by_name(self) -> dict[str, MicrographEntry]:
        return {e.name: e for e in self.entries}

    def by_key(self) -> dict[str, MicrographEntry]:
        return {e.key: e for e in self.entries}

    def resolver(self) -> Callable[[str], MicrographEntry | None]:
        """Find an entry from a name another file uses: exact name, then path after jobNNN/, then stem."""
        exact = self.by_name()
        post: dict[str, list[MicrographEntry]] = {}
        stem: dict[str, list[MicrographEntry]] = {}
        for e in self.entries:
            post.setdefault(_strip_ext(decompose_pipeline_name(e.name)[2]), []).append(e)
            stem.setdefault(_strip_ext(os.path.basename(e.name)), []).append(e)

        def find(name: str) -> MicrographEntry | None:
            name = str(name)
            if name in exact:
                return exact[name]
            for table, k in ((post, _strip_ext(decompose_pipeline_name(name)[2])),
                             (stem, _strip_ext(os.path.basename(name)))):
                hits = table.get(k, [])
                if len(hits) == 1:
                    return hits[0]
            return None

        return find


def _strip_ext(name: str) -> str:
    base, ext = os.path.splitext(name)
    return base if ext and "/" not in ext else name


def _micrograph_table(data: dict, path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    tables = {k: v for k, v in data.items() if isinstance(v, pd.DataFrame)}
    if "micrographs" in tables:
        mics = tables["micrographs"]
    else:
        cands = [v for k, v in tables.items() if k != "optics" and "rlnMicrographName" in v.columns]
        if not cands:
            found = ", ".join(f"data_{k} ({', '.join(map(str, v.columns[:6]))})" for k, v in tables.items()) or "none"
            raise RelionError(f"{path}: no micrographs table with rlnMicrographName (tables found: {found}); "
                              "select the micrographs STAR of a MotionCorr or CtfFind job as 'Input micrographs'")
        mics = cands[0]
    if "rlnMicrographName" not in mics.columns:
        raise RelionError(f"{path}: table data_micrographs has no rlnMicrographName column "
                          f"(columns: {', '.join(map(str, mics.columns))})")
    optics = tables.get("optics")
    return mics, optics


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def optics_pixel_size(row: Mapping, where: str) -> tuple[float | None, str, str | None]:
    """Pixel size of micrographs from one optics row (or a 3.0-style micrograph row).

    Returns (value, source, warning).  Chain: rlnMicrographPixelSize -> rlnImagePixelSize (warned,
    as RELION does) -> rlnMicrographOriginalPixelSize x rlnMicrographBinning -> (3.0)
    rlnDetectorPixelSize / rlnMagnification.  None means: use the MRC header.
    """
    ps = _float(row.get("rlnMicrographPixelSize"))
    if ps:
        return ps, "rlnMicrographPixelSize", None
    ps = _float(row.get("rlnImagePixelSize"))
    if ps:
        return ps, "rlnImagePixelSize", (f"{where}: no rlnMicrographPixelSize; using rlnImagePixelSize {ps:g} A "
                                         "(a particle-image label) as the micrograph pixel size, as RELION does")
    ps = _float(row.get("rlnMicrographOriginalPixelSize"))
    if ps:
        binning = _float(row.get("rlnMicrographBinning"))
        if binning:
            return ps * binning, "rlnMicrographOriginalPixelSize x rlnMicrographBinning", None
        return ps, "rlnMicrographOriginalPixelSize", (
            f"{where}: no rlnMicrographPixelSize; using rlnMicrographOriginalPixelSize {ps:g} A "
            "(correct only if the movies were not binned)")
    det, mag = _float(row.get("rlnDetectorPixelSize")), _float(row.get("rlnMagnification"))
    if det and mag:
        return det * 1e4 / mag, "rlnDetectorPixelSize / rlnMagnification", None
    return None, "MRC header", None


def decompose_pipeline_name(name: str) -> tuple[str, str, str]:
    """Split ``Dir/jobNNN/rest`` into (``Dir/``, ``jobNNN/``, ``rest``) as RELION does.

    The first ``/job`` followed by three digits marks the job folder; without one the whole
    name is ``rest``.
    """
    m = re.search(r"/(job\d{3})", name)
    if m is None:
        return "", "", name
    slash2 = name.find("/", m.start() + 6)
    if slash2 < 0:
        slash2 = len(name) - 1
    return name[: m.start() + 1], name[m.start() + 1 : slash2 + 1], name[slash2 + 1 :]


def mic_root(mic_name: str) -> str:
    """The part of ``mic_name`` after its ``jobNNN/`` folder, without extension.

    A leading ``/`` or a ``..`` (absolute or outside names) is dropped so that outputs built on it
    stay inside the job folder.
    """
    post = _strip_ext(decompose_pipeline_name(mic_name)[2])
    return "/".join(p for p in post.split("/") if p not in ("", ".", ".."))


def output_root(outdir: str, mic_name: str) -> str:
    """``outdir`` + :func:`mic_root`: RELION's rule for per-micrograph outputs (AutoPick's getOutputRootName)."""
    return job_dir(outdir) + mic_root(mic_name)


def coordinates_path(outdir: str, mic_name: str, pickname: str) -> str:
    """Per-micrograph coordinate file: ``<outdir><name after jobNNN/ w/o extension>_<pickname>.star``."""
    return f"{output_root(outdir, mic_name)}_{pickname}.star"


def job_dir(outdir: str) -> str:
    """RELION's job folder spelling: project-relative with exactly one trailing slash."""
    out = str(outdir).strip()
    if not out:
        raise RelionError("--o is empty: RELION passes the job folder, e.g. --o External/job005/")
    return out.rstrip("/") + "/"


def _unique_keys(names: list[str]) -> list[str]:
    """File stems, or (when two micrographs share a stem) their path after jobNNN/ with '/' -> '__'."""
    stems = [_strip_ext(os.path.basename(n)) for n in names]
    if len(set(stems)) == len(stems):
        return stems
    keys = [_strip_ext(decompose_pipeline_name(n)[2]).strip("/").replace("/", "__") for n in names]
    if len(set(keys)) != len(keys):
        keys = [n.strip("/").replace("/", "__") for n in names]
    return keys


def read_micrographs_star(path: str | os.PathLike, project_dir: str | os.PathLike = ".") -> MicrographTable:
    """Micrographs of a MotionCorr/CtfFind/Select STAR (3.1/4/5 optics + micrographs, or 3.0 single table)."""
    path = Path(path)
    data = read_star(path)
    mics, optics = _micrograph_table(data, path)
    if len(mics) == 0:
        raise RelionError(f"{path}: the micrographs table is empty")
    notes: list[str] = []
    optics_ps: dict[int, tuple[float | None, str]] = {}
    if optics is not None and len(optics):
        if "rlnOpticsGroup" not in optics.columns:
            raise RelionError(f"{path}: table data_optics has no rlnOpticsGroup column")
        for row in optics.to_dict("records"):
            g = int(row["rlnOpticsGroup"])
            ps, src, warn = optics_pixel_size(row, f"{path} optics group {g}")
            if warn:
                notes.append(warn)
            optics_ps[g] = (ps, src)
    names = [str(n) for n in mics["rlnMicrographName"]]
    keys = _unique_keys(names)
    entries = []
    has_group = "rlnOpticsGroup" in mics.columns
    for i, (row, key) in enumerate(zip(mics.to_dict("records"), keys)):
        name = str(row["rlnMicrographName"])
        group = int(row["rlnOpticsGroup"]) if has_group and pd.notna(row["rlnOpticsGroup"]) else None
        if optics_ps:
            if group is None:
                if len(optics_ps) != 1:
                    raise RelionError(f"{path}: micrograph {name} has no rlnOpticsGroup and there are "
                                      f"{len(optics_ps)} optics groups")
                group = next(iter(optics_ps))
            if group not in optics_ps:
                raise RelionError(f"{path}: micrograph {name} is in optics group {group}, "
                                  "which data_optics does not define")
            ps, src = optics_ps[group]
        else:  # RELION 3.0: pixel size (if any) on the micrograph row itself
            ps, src, warn = optics_pixel_size(row, f"{path} row {i + 1}")
            if warn and warn not in notes:
                notes.append(warn)
        p = Path(name)
        entries.append(MicrographEntry(name=name, path=p if p.is_absolute() else Path(project_dir) / p, key=key,
                                       pixel_size=ps, pixel_size_source=src, optics_group=group))
    return MicrographTable(path=path, version=star_version(path), entries=entries, notes=notes)


@dataclass
class HeaderInfo:
    shape: tuple[int, int]  # (ny, nx)
    pixel_size: float | None


def read_header(path: str | os.PathLike) -> HeaderInfo:
    """Shape and voxel size from an MRC header (cheap: the data are not read)."""
    import mrcfile

    from .io import MicrographError

    path = Path(path)
    if not path.exists():
        raise MicrographError(f"micrograph not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(str(path), mode="r", header_only=True, permissive=True) as mrc:
                h = mrc.header
                shape = (int(h.ny), int(h.nx))
                vs = float(mrc.voxel_size.x)
    except Exception as exc:
        raise MicrographError(f"{path}: cannot read the MRC header ({exc})") from exc
    return HeaderInfo(shape, vs if vs > 0 else None)


def check_pixel_size(entry: MicrographEntry, header: HeaderInfo, warn_above: float = 0.02,
                     fail_above: float = 0.10) -> str | None:
    """Compare the STAR pixel size with the MRC header.

    Fills in the header value when the STAR has none.  Returns a warning for a small mismatch
    (the STAR value is used, as RELION does), raises RelionError for a large one (a diameter in
    Angstrom would become a wrong radius in pixels).  Headers that say 0 or 1.0 are treated as unset.
    """
    hp = header.pixel_size
    if entry.pixel_size is None:
        if not hp:
            raise RelionError(f"{entry.path}: no pixel size in the micrographs STAR nor in the MRC header; "
                              "give --pixel_size (Angstrom)")
        entry.pixel_size, entry.pixel_size_source = hp, "MRC header"
        return None
    if not hp or abs(hp - 1.0) < 1e-6:
        return None
    rel = abs(hp - entry.pixel_size) / entry.pixel_size
    if rel > fail_above:
        raise RelionError(
            f"pixel size mismatch for {entry.path}: {entry.pixel_size:g} A in the micrographs STAR "
            f"({entry.pixel_size_source}) but {hp:g} A in the MRC header. Fix the STAR or the header, or give "
            "--pixel_size to say which is right")
    if rel > warn_above:
        return (f"{entry.path}: MRC header pixel size {hp:g} A differs from the STAR's {entry.pixel_size:g} A "
                f"({100 * rel:.0f}%); using the STAR value")
    return None


# --- coordinate lists and per-micrograph coordinate files --------------------------------------
def read_coordinate_list(path: str | os.PathLike, project_dir: str | os.PathLike = ".") -> dict[str, Path]:
    """rlnMicrographName -> per-micrograph coordinate file, from a RELION coordinate list.

    Accepts the RELION 3.1+/4/5 ``data_coordinate_files`` table (AutoPick/ManualPick output) and
    the legacy ``coords_suffix_<name>.star`` (its first word names the micrographs STAR; files are
    ``<dir of the suffix file>/<name after jobNNN/ w/o extension>_<name>.star``).  Listed files
    that do not exist are left out (RELION lists only micrographs that have one, and the picker
    writes a file only when the user saves).
    """
    path = Path(path)
    project_dir = Path(project_dir)
    if not path.exists():
        raise RelionError(f"coordinate list not found: {path}")
    out: dict[str, Path] = {}
    if path.name.startswith("coords_suffix_"):
        words = path.read_text(errors="replace").split()
        if not words:
            raise RelionError(f"{path}: empty; a coords_suffix file names the micrographs STAR on its first line")
        suffix = path.name[len("coords_suffix_"):]
        suffix = suffix[:-5] if suffix.endswith(".star") else suffix
        mics = read_micrographs_star(project_dir / words[0] if not Path(words[0]).is_absolute() else words[0],
                                     project_dir)
        folder = os.path.relpath(path.parent, project_dir) if not path.is_absolute() else str(path.parent)
        for e in mics.entries:
            f = project_dir / coordinates_path(folder, e.name, suffix)
            if f.exists():
                out[e.name] = f
        return out
    return _listed_files(read_star(path), path, project_dir)


def _list_table(data: dict) -> pd.DataFrame | None:
    table = data.get("coordinate_files")
    if isinstance(table, pd.DataFrame):
        return table
    return next((v for v in data.values() if isinstance(v, pd.DataFrame)
                 and {"rlnMicrographName", "rlnMicrographCoordinates"} <= set(v.columns)), None)


def _listed_files(data: dict, path: Path, project_dir: Path) -> dict[str, Path]:
    table = _list_table(data)
    if table is None:
        raise RelionError(f"{path}: not a coordinate list (no data_coordinate_files table with "
                          "rlnMicrographName and rlnMicrographCoordinates)")
    missing = {"rlnMicrographName", "rlnMicrographCoordinates"} - set(table.columns)
    if missing:
        raise RelionError(f"{path}: data_coordinate_files lacks column(s) {', '.join(sorted(missing))}")
    out: dict[str, Path] = {}
    for name, coords in zip(table["rlnMicrographName"], table["rlnMicrographCoordinates"]):
        f = Path(str(coords))
        f = f if f.is_absolute() else Path(project_dir) / f
        if f.exists():
            out[str(name)] = f
    return out


def is_coordinate_list(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.name.startswith("coords_suffix_"):
        return True
    try:
        return _list_table(read_star(path)) is not None
    except RelionError:
        return False


@dataclass
class Coordinates:
    """Picks of one micrograph: centres in pixels of the micrograph file, and a label per pick."""

    x: np.ndarray
    y: np.ndarray
    label: np.ndarray  # 1 positive, 0 negative


def selection_to_label(types: Iterable) -> np.ndarray:
    """rlnParticleSelectionType -> label: 1 (red, CTRL+1) = negative; 2 (green, default) and 3-6 = positive."""
    t = np.asarray(pd.to_numeric(pd.Series(list(types)), errors="coerce").fillna(POSITIVE_SELECTION_TYPE), int)
    return (t != NEGATIVE_SELECTION_TYPE).astype(int)


def _coordinate_table(data: dict, path: Path) -> pd.DataFrame:
    tables = [v for v in data.values() if isinstance(v, pd.DataFrame)]
    for t in tables:
        if {"rlnCoordinateX", "rlnCoordinateY"} <= set(t.columns):
            return t
    for t in tables:  # a header-only table with no rows may have lost columns
        if len(t) == 0:
            return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
    cols = ", ".join(str(c) for t in tables for c in t.columns) or "none"
    raise RelionError(f"{path}: no rlnCoordinateX/rlnCoordinateY columns (columns found: {cols})")


def read_mic_coordinates(path: str | os.PathLike) -> Coordinates:
    """A per-micrograph coordinate file (AutoPick, ManualPick, ours), with rlnParticleSelectionType labels."""
    path = Path(path)
    if not path.exists():
        raise RelionError(f"coordinate file not found: {path}")
    if path.stat().st_size == 0:
        return Coordinates(np.empty(0), np.empty(0), np.empty(0, int))
    t = _coordinate_table(read_star(path), path)
    try:
        x = t["rlnCoordinateX"].astype(float).to_numpy()
        y = t["rlnCoordinateY"].astype(float).to_numpy()
    except (TypeError, ValueError) as exc:
        raise RelionError(f"{path}: non-numeric coordinates ({exc})") from exc
    if "rlnParticleSelectionType" in t.columns:
        label = selection_to_label(t["rlnParticleSelectionType"])
    else:
        label = np.ones(x.size, int)
    return Coordinates(x, y, label)


def read_picks_table(path: str | os.PathLike, project_dir: str | os.PathLike = ".",
                     pixel_size_of: Callable[[str], float | None] | None = None) -> pd.DataFrame:
    """Picks with micrograph names from any RELION file that has them, as (micrograph, x, y, label).

    * coordinate list (``coordinate_files`` or ``coords_suffix_*``): every listed file, labels from
      rlnParticleSelectionType;
    * particles STAR or any table with rlnMicrographName + rlnCoordinateX/Y: refined centres
      (rlnCoordinate - rlnOrigin{X,Y}Angst / micrograph pixel size, when ``pixel_size_of`` knows it);
      labels from rlnParticleSelectionType, rlnSelected (1/0) or a ``label``/``cryoalLabel``
      column (1/0); none of these -> NaN (the caller decides).
    """
    path = Path(path)
    data = None if path.name.startswith("coords_suffix_") else read_star(path)
    if data is None or _list_table(data) is not None:
        files = (read_coordinate_list(path, project_dir) if data is None
                 else _listed_files(data, path, Path(project_dir)))
        rows = []
        for name, f in files.items():
            c = read_mic_coordinates(f)
            rows.append(pd.DataFrame({"micrograph": name, "x": c.x, "y": c.y, "label": c.label.astype(float)}))
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["micrograph", "x", "y", "label"])
    table = next((v for v in data.values() if isinstance(v, pd.DataFrame)
                  and {"rlnCoordinateX", "rlnCoordinateY"} <= set(v.columns)), None)
    if table is None:
        raise RelionError(f"{path}: no table with rlnCoordinateX and rlnCoordinateY")
    if "rlnMicrographName" not in table.columns:
        raise RelionError(f"{path}: the coordinate table has no rlnMicrographName column, so the picks "
                          "cannot be matched to micrographs")
    names = table["rlnMicrographName"].astype(str)
    x = table["rlnCoordinateX"].astype(float).to_numpy().copy()
    y = table["rlnCoordinateY"].astype(float).to_numpy().copy()
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(table.columns) and pixel_size_of is not None:
        ps = np.array([pixel_size_of(n) or np.nan for n in names], float)
        ok = np.isfinite(ps)
        x[ok] -= table["rlnOriginXAngst"].astype(float).to_numpy()[ok] / ps[ok]
        y[ok] -= table["rlnOriginYAngst"].astype(float).to_numpy()[ok] / ps[ok]
    if "rlnParticleSelectionType" in table.columns:
        label = selection_to_label(table["rlnParticleSelectionType"]).astype(float)
    elif "rlnSelected" in table.columns:
        label = (pd.to_numeric(table["rlnSelected"], errors="coerce").fillna(1).to_numpy() > 0).astype(float)
    else:
        col = next((c for c in ("label", "cryoalLabel", "rlnCryoalLabel") if c in table.columns), None)
        label = (pd.to_numeric(table[col], errors="coerce").to_numpy(float) if col
                 else np.full(x.size, np.nan))
        if col and not np.isin(label[np.isfinite(label)], (0, 1)).all():
            raise RelionError(f"{path}: column {col} must be 1 (positive) or 0 (negative)")
    return pd.DataFrame({"micrograph": names.to_numpy(), "x": x, "y": y, "label": label})


# --- figure of merit and Extract's threshold ---------------------------------------------------
FOM_DECIMALS = 6  # rlnAutopickFigureOfMerit as written (files.picks_frame rounds, starfile writes %.6f)


def written_fom(scores) -> np.ndarray:
    """The FOM values RELION reads back from our coordinate files (probabilities to 6 decimals)."""
    return np.round(np.asarray(scores, float), FOM_DECIMALS)


def extract_keeps(fom, threshold: float) -> np.ndarray:
    """Which FOMs RELION's Extract keeps with 'Minimum autopick FOM' = ``threshold``.

    relion_preprocess keeps ``fom > threshold`` (strictly), with the FOM read as a double and the
    threshold parsed as a single-precision float (textToFloat); the same in 4.0.2 and 5.0.1.
    """
    return np.asarray(fom, float) > float(np.float32(threshold))


@dataclass(frozen=True)
class FomThreshold:
    """A threshold that Extract and our autopick.star agree on: ``text`` is what the user types."""

    value: float
    text: str


def extract_threshold(scores, lowest_kept: float) -> FomThreshold:
    """The shortest decimal (3 to 7 places) with which Extract keeps exactly the written FOMs >= ``lowest_kept``.

    Rounding the optimum up (0.460 for 0.459873) would make Extract drop the lowest pick; the
    value returned lies below the lowest kept FOM and at or above the next one down, so
    ``extract_keeps(written_fom(scores), value)`` is exactly that set.
    """
    from decimal import ROUND_CEILING, Decimal

    w = written_fom(scores)
    lo = float(written_fom(lowest_kept))
    below = w[w < lo]
    floor = float(below.max()) if below.size else -np.inf
    lo_dec = Decimal(f"{lo:.{FOM_DECIMALS}f}")
    for places in range(3, FOM_DECIMALS + 2):
        q = Decimal(1).scaleb(-places)
        t = ((lo_dec / q).to_integral_value(ROUND_CEILING) - 1) * q
        v = float(t)
        if floor <= float(np.float32(v)) < lo:
            return FomThreshold(v, f"{t:.{places}f}")
    raise RelionError(f"no threshold separates FOM {lo} from {floor}")  # cannot happen for 6-decimal FOMs


def keep_for_extract(picks, threshold: float):
    """The picks (``extract.Picks``) Extract keeps at ``threshold``: what autopick.star must hold."""
    from .extract import Picks

    keep = extract_keeps(written_fom(picks.score), threshold)
    return Picks(picks.name, picks.x[keep], picks.y[keep], picks.score[keep])


# --- writing ---------------------------------------------------------------------------------
def coordinates_frame(picks, selection_type: int = POSITIVE_SELECTION_TYPE) -> pd.DataFrame:
    """RELION autopick columns for one micrograph plus rlnParticleSelectionType.

    The selection type is there for RELION's picker: when a user adds a pick to a file without the
    column, the picker adds it with 0 for every existing row and then refuses to draw them.
    """
    df = picks_frame(picks)
    df["rlnParticleSelectionType"] = np.full(len(df), int(selection_type), dtype=int)
    return df


def write_coordinates(outdir: str, mic_names: Iterable[str], picks_of: Mapping, pickname: str,
                      list_name: str, version: int, project_dir: str | os.PathLike = ".") -> tuple[str, dict[str, str]]:
    """Per-micrograph files ``<outdir>…_<pickname>.star`` and the list ``<outdir><list_name>``.

    ``picks_of``: rlnMicrographName -> Picks (an empty Picks writes an empty file the user can
    add to).  Returns (list path, {rlnMicrographName: per-mic path}), project-relative.
    """
    project_dir = Path(project_dir)
    files: dict[str, str] = {}
    for name in mic_names:
        if name not in picks_of:
            continue
        rel = coordinates_path(outdir, name, pickname)
        write_star(project_dir / rel, {"": coordinates_frame(picks_of[name])}, version)
        files[name] = rel
    lst = job_dir(outdir) + list_name
    table = pd.DataFrame({"rlnMicrographName": list(files), "rlnMicrographCoordinates": list(files.values())})
    write_star(project_dir / lst, {"coordinate_files": table}, version)
    return lst, files


def write_output_nodes(outdir: str, nodes: list[tuple[str, str]], major: int,
                       project_dir: str | os.PathLike = ".") -> str:
    """``RELION_OUTPUT_NODES.star``: table output_nodes with the STRING type label (RELION 4/5).

    ``nodes``: (project-relative path, kind in NODE_LABELS or a full label).  RELION 5 also reads
    the optional depth column; RELION 4 gets only the two columns it knows.
    """
    labels = NODE_LABELS[major]
    df = pd.DataFrame({"rlnPipeLineNodeName": [n for n, _ in nodes],
                       "rlnPipeLineNodeTypeLabel": [labels.get(k, k) for _, k in nodes]})
    if major >= 5:
        df["rlnPipeLineNodeTypeLabelDepth"] = 1
    path = job_dir(outdir) + OUTPUT_NODES
    write_star(Path(project_dir) / path, {"output_nodes": df}, VERSION_TAG[major])
    return path


def file_digest(path: str | os.PathLike) -> str | None:
    """sha1 of a file's bytes (None when it does not exist): tells an edited file from ours."""
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# --- exit markers ----------------------------------------------------------------------------
def marker(outdir: str, name: str, project_dir: str | os.PathLike = ".") -> Path:
    return Path(project_dir) / (job_dir(outdir) + name)


def clear_exit_markers(outdir: str, project_dir: str | os.PathLike = ".") -> None:
    """Remove SUCCESS/FAILURE/ABORTED left by an earlier run (RELION does this too before a run)."""
    for name in (SUCCESS, FAILURE, ABORTED):
        marker(outdir, name, project_dir).unlink(missing_ok=True)


def write_marker(outdir: str, name: str, project_dir: str | os.PathLike = ".") -> Path:
    """Create an (empty) exit marker atomically.  SUCCESS must be the very last thing a run writes."""
    path = marker(outdir, name, project_dir)
    write_text(path, "")
    return path


def abort_requested(outdir: str, project_dir: str | os.PathLike = ".") -> bool:
    return marker(outdir, ABORT_NOW, project_dir).exists()


def check_abort(outdir: str, project_dir: str | os.PathLike = ".") -> None:
    """Raise JobAborted when RELION_JOB_ABORT_NOW exists (call between micrographs)."""
    if abort_requested(outdir, project_dir):
        raise JobAborted(f"{marker(outdir, ABORT_NOW, project_dir)} found")


def finish_aborted(outdir: str, project_dir: str | os.PathLike = ".") -> None:
    """RELION's abort protocol: write RELION_JOB_EXIT_ABORTED, then delete RELION_JOB_ABORT_NOW."""
    write_marker(outdir, ABORTED, project_dir)
    marker(outdir, ABORT_NOW, project_dir).unlink(missing_ok=True)


def signal_pipeline_changed(project_dir: str | os.PathLike = ".") -> bool:
    """Create ``.pipeline_has_changed`` in a RELION project so an open GUI notices the exit marker.

    The GUI's timer only checks running jobs for exit markers while this file exists; RELION's
    own programs do not create it at exit (pipeline_control.cpp), so their jobs too stay under
    "Running" until something else refreshes the GUI.  The file is RELION's generic "re-read the
    pipeline" signal (every pipeline write creates it, the next completion check removes it), so
    creating it makes RELION do nothing but that check.  Outside a project (no
    default_pipeline.star) nothing is written.  Returns whether the file was created.
    """
    folder = Path(project_dir)
    if not (folder / "default_pipeline.star").exists():
        return False
    try:
        (folder / PIPELINE_HAS_CHANGED).touch()
    except OSError:
        return False  # e.g. a read-only project folder: the GUI then updates on the next click, as for RELION's jobs
    return True
