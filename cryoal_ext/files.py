"""Coordinate files: Topaz-style txt and simple STAR, read and written (always atomically)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from .atomic import atomic_path
from .extract import Picks


class CoordinateFileError(ValueError):
    """A coordinate file that cannot be read, with the file named in the message."""


def _where(lines: list[int] | None, i: int) -> str:
    """Row ``i`` (0-based) of a table as the user finds it: a line of a text file, else a STAR data row."""
    return f"data row {i + 1} (line {lines[i]})" if lines else f"data row {i + 1}"


def _numbers(path: Path, column: pd.Series, what: str, lines: list[int] | None = None) -> pd.Series:
    """``column`` as floats; a missing or non-numeric entry is a CoordinateFileError naming the file."""
    values = pd.to_numeric(column, errors="coerce").astype(float)
    bad = ~np.isfinite(values.to_numpy())
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CoordinateFileError(f"{path}: {what} of {_where(lines, i)} is missing or not a number ({column.iloc[i]!r})")
    return values


def _fields(line: str, n: int | None) -> list[str]:
    """Fields of a Topaz-style line: tab-separated when it has tabs (names may hold spaces), else any whitespace."""
    if "\t" in line:
        parts = [f.strip() for f in line.rstrip("\r\n").split("\t")]
        while len(parts) > 1 and parts[-1] == "" and (n is None or len(parts) > n):
            parts.pop()  # a trailing tab
        if n is None or len(parts) == n:
            return parts
    return line.split()


def _read_text_table(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """A whitespace/tab table with a header line, as strings, and the file line of each row."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CoordinateFileError(f"{path}: not a readable coordinate table ({exc})") from exc
    numbered = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise CoordinateFileError(f"{path}: empty file (expected Topaz-style 'image_name x_coord y_coord [score]')")
    header = _fields(numbered[0][1], None)
    rows, lines = [], []
    for i, line in numbered[1:]:
        f = _fields(line, len(header))
        f += [""] * (len(header) - len(f))  # a short row: its missing values are reported by column below
        if len(f) != len(header):
            raise CoordinateFileError(f"{path}: line {i} has {len(f)} field(s) where the header has {len(header)} "
                                      f"({line.strip()[:80]!r})")
        rows.append(f)
        lines.append(i)
    return pd.DataFrame(rows, columns=header, dtype=str), lines


def _name_of(value: str) -> str:
    from .io import micrograph_name

    return micrograph_name(str(value))


def read_coordinates(path: str | os.PathLike) -> pd.DataFrame:
    """Read picks/truth as a table with columns image_name, x, y (+ score, label when present).

    Accepts Topaz txt (``image_name x_coord y_coord [score]``) and RELION STAR with
    ``rlnMicrographName rlnCoordinateX rlnCoordinateY`` (image names reduced to file stems).
    """
    path = Path(path)
    if not path.exists():
        raise CoordinateFileError(f"coordinate file not found: {path}")
    if path.suffix.lower() == ".star":
        try:
            data = starfile.read(path, always_dict=True)
        except Exception as exc:
            raise CoordinateFileError(f"{path}: not a readable STAR file ({exc})") from exc
        table = next((df for df in data.values() if isinstance(df, pd.DataFrame)
                      and {"rlnCoordinateX", "rlnCoordinateY"} <= set(df.columns)), None)
        if table is None:
            raise CoordinateFileError(f"{path}: no table with rlnCoordinateX and rlnCoordinateY")
        if "rlnMicrographName" not in table.columns:
            raise CoordinateFileError(f"{path}: STAR table lacks rlnMicrographName")
        out = pd.DataFrame({"image_name": table["rlnMicrographName"].map(_name_of),
                            "x": _numbers(path, table["rlnCoordinateX"], "rlnCoordinateX"),
                            "y": _numbers(path, table["rlnCoordinateY"], "rlnCoordinateY")})
        if "rlnAutopickFigureOfMerit" in table.columns:
            out["score"] = _numbers(path, table["rlnAutopickFigureOfMerit"], "rlnAutopickFigureOfMerit")
        return out
    df, lines = _read_text_table(path)
    missing = {"image_name", "x_coord", "y_coord"} - set(df.columns)
    if missing:
        raise CoordinateFileError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                                  "(expected Topaz-style 'image_name x_coord y_coord [score]')")
    out = pd.DataFrame({"image_name": df["image_name"].astype(str),
                        "x": _numbers(path, df["x_coord"], "x_coord", lines),
                        "y": _numbers(path, df["y_coord"], "y_coord", lines)})
    if "score" in df.columns:
        out["score"] = _numbers(path, df["score"], "score", lines)
    out.attrs["lines"] = lines
    return out


def check_inside(table: pd.DataFrame, shapes: dict[str, tuple[int, int]], path: str | os.PathLike) -> None:
    """Refuse coordinates outside their micrograph (``shapes``: name -> (ny, nx)), naming the file, row and size.

    Why here: a label is a spot on a micrograph; one off the image is a wrong file, a wrong scale or a typo,
    never an answer, and stored it would train the model on the padding.
    """
    from .coords import outside

    lines = table.attrs.get("lines")
    names = table["image_name"].to_numpy()
    x, y = table["x"].to_numpy(float), table["y"].to_numpy(float)
    for name, shape in shapes.items():
        sel = np.flatnonzero(names == name)
        if sel.size == 0:
            continue
        bad = sel[outside(x[sel], y[sel], shape)]
        if bad.size:
            i = int(bad[0])
            ny, nx = shape
            raise CoordinateFileError(f"{path}: {_where(lines, i)} puts a particle at x={x[i]:g}, y={y[i]:g} outside "
                                      f"micrograph {name} ({nx} x {ny} px: 0 <= x <= {nx}, 0 <= y <= {ny}); "
                                      f"{bad.size} such row(s). Are these coordinates for a binned or another micrograph?")


def by_micrograph(table: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: (g["x"].to_numpy(float), g["y"].to_numpy(float)) for name, g in table.groupby("image_name")}


def write_topaz(path: str | os.PathLike, picks: list[Picks]) -> None:
    """Topaz-style tab-separated ``image_name x_coord y_coord score`` (original pixels, probability)."""
    lines = ["image_name\tx_coord\ty_coord\tscore"]
    for p in picks:
        order = np.argsort(-p.score, kind="stable")
        lines += [f"{p.name}\t{p.x[i]:.1f}\t{p.y[i]:.1f}\t{p.score[i]:.6f}" for i in order]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def picks_frame(p: Picks) -> pd.DataFrame:
    """RELION autopick columns for one micrograph (x = column, y = row, FOM = probability)."""
    return pd.DataFrame({
        "rlnCoordinateX": np.round(p.x, 2), "rlnCoordinateY": np.round(p.y, 2),
        "rlnClassNumber": np.zeros(len(p), dtype=int),
        "rlnAutopickFigureOfMerit": np.round(p.score, 6),
        "rlnAnglePsi": np.zeros(len(p), dtype=float),
    })


def write_star(path: str | os.PathLike, tables: dict[str, pd.DataFrame], version: int | None = 30001) -> None:
    """STAR through starfile, atomically, with RELION's ``# version`` line when given."""
    with atomic_path(path) as tmp:
        starfile.write(tables, tmp, overwrite=True)
        if version:
            body = tmp.read_text()
            tmp.write_text(f"\n# version {version}\n\n" + body)


def write_picks_star(path: str | os.PathLike, picks: Picks, version: int | None = 30001) -> None:
    write_star(path, {"": picks_frame(picks)}, version)
