"""RELION coordinate files: coordinate lists, per-micrograph picks, FOM and Extract's threshold.

Reading what Manual/Auto picking jobs write (a coordinate list naming one STAR per micrograph,
or a particles table) and writing our picks so that Extract and the picker read them back.
All writes are atomic (``files.write_star``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from ..files import picks_frame, write_star
from .micrographs import read_micrographs_star
from .star import RelionError, coordinates_path, job_dir, read_star

# rlnParticleSelectionType as the picker colours it: 1 red (CTRL+1), 2 green (default), 3-6 others.
NEGATIVE_SELECTION_TYPE = 1
POSITIVE_SELECTION_TYPE = 2


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
    from ..extract import Picks

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


def file_digest(path: str | os.PathLike) -> str | None:
    """sha1 of a file's bytes (None when it does not exist): tells an edited file from ours."""
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
