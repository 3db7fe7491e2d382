"""RELION micrographs STAR files: the micrograph table, the pixel-size fallback chain, MRC headers.

What a MotionCorr/CtfFind/Select job hands on, read the way RELION writes it (3.0 single table,
3.1/4/5 optics + micrographs), with errors that name the file.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from .star import RelionError, _strip_ext, decompose_pipeline_name, read_star, star_version


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

    from ..io import MicrographError

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
