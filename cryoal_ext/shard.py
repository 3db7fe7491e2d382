"""Splitting prediction across processes or nodes, and joining the outputs.

A prediction folder holds one small output per micrograph, written atomically, so any number of
``cryoal predict --shard i/N`` processes (a SLURM array, several cryoSPARC lanes) can fill it
independently, a killed run resumes where it stopped, and ``cryoal merge`` joins the pieces into
exactly what a single process writes.

Layout of ``out_dir``::

    predict.json                    settings + every micrograph (name, path): what "complete" means
    micrographs/<name>_picks.txt    Topaz-style picks of one micrograph (written last: the done mark)
    micrographs/<name>_picks.star   the same as a RELION coordinate STAR (when asked for)
    micrographs/<name>_error.txt    why a micrograph could not be read (removed once it succeeds)
    picks.txt, picks.star, coordinates.star   written by merge (or by an unsharded run)
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import write_json, write_text
from .extract import Picks

MANIFEST = "predict.json"
FORMAT = "cryoal_ext.predict/1"
PER_MIC = "micrographs"
HEADER = "image_name\tx_coord\ty_coord\tscore"


class ShardError(ValueError):
    """A bad --shard value, an inconsistent output folder, or missing outputs at merge time."""


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (1-based) of ``count`` parts of a sorted micrograph list."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str | None, environ: dict | None = None) -> "Shard":
        """``i/N``; ``slurm``: this task of a SLURM job array (``sbatch --array=...``), whatever its numbering."""
        if not text:
            return cls()
        if str(text).strip().lower() == "slurm":
            env = os.environ if environ is None else environ
            try:
                task, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", 0))
                count = int(env["SLURM_ARRAY_TASK_COUNT"])
            except (KeyError, ValueError):
                raise ShardError("--shard slurm: not inside a SLURM job array (SLURM_ARRAY_TASK_ID / "
                                 "SLURM_ARRAY_TASK_COUNT unset); give i/N") from None
            if int(env.get("SLURM_ARRAY_TASK_STEP", 1)) != 1:
                raise ShardError("--shard slurm needs a contiguous array (--array=1-N or 0-(N-1), no step)")
            return cls.parse(f"{task - first + 1}/{count}")
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ShardError(f"--shard {text!r}: expected i/N, e.g. 1/4 (shards are numbered 1..N)")
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or not 1 <= i <= n:
            hint = " (shards are numbered from 1: with SLURM use --array=1-N)" if i == 0 else ""
            raise ShardError(f"--shard {text}: need 1 <= i <= N{hint}")
        return cls(i, n)

    def select(self, names: list[str]) -> list[str]:
        """Round-robin over the sorted names: deterministic, and balanced when sizes drift in time."""
        ordered = sorted(names)
        return [n for k, n in enumerate(ordered) if k % self.count == self.index - 1]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def per_mic_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / PER_MIC


def txt_path(out_dir, name: str) -> Path:
    return per_mic_dir(out_dir) / f"{name}_picks.txt"


def star_path(out_dir, name: str) -> Path:
    return per_mic_dir(out_dir) / f"{name}_picks.star"


def error_path(out_dir, name: str) -> Path:
    return per_mic_dir(out_dir) / f"{name}_error.txt"


def is_complete(out_dir, name: str, formats: set[str]) -> bool:
    """Each file is written atomically and the txt last, so its presence means the micrograph is done."""
    return txt_path(out_dir, name).exists() and ("star" not in formats or star_path(out_dir, name).exists())


def picks_lines(p: Picks) -> list[str]:
    """Lines of ``files.write_topaz`` for one micrograph (best first), without the header."""
    order = np.argsort(-p.score, kind="stable")
    return [f"{p.name}\t{p.x[i]:.1f}\t{p.y[i]:.1f}\t{p.score[i]:.6f}" for i in order]


_STAR_RESERVED = ("data_", "loop_", "save_", "global_", "stop_")


def star_value(value: str) -> str:
    """A STAR value as written: quoted when it holds whitespace or could be read as syntax (names with spaces)."""
    text = str(value)
    if text and not any(c.isspace() for c in text) and text[0] not in "_#$'\"" \
            and not text.lower().startswith(_STAR_RESERVED):
        return text
    return f"'{text}'" if '"' in text else f'"{text}"'


def star_text(tables: dict[str, pd.DataFrame], version: int | None = 30001) -> str:
    """STAR text with RELION's ``# version`` line and no time stamp, so equal picks give equal bytes."""
    out = [f"\n# version {version}\n"] if version else []
    for block, df in tables.items():
        out.append(f"data_{block}\n\nloop_")
        out += [f"_{c} #{i}" for i, c in enumerate(df.columns, 1)]
        cols = []
        for c in df.columns:
            v = df[c].to_numpy()
            cols.append([f"{x:.6f}" for x in v] if v.dtype.kind == "f" else [star_value(x) for x in v])
        out += ["\t".join(row) for row in zip(*cols)] if cols else []
        out.append("")
    return "\n".join(out) + "\n"


def write_micrograph(out_dir, picks: Picks, formats: set[str]) -> None:
    """One micrograph's outputs, STAR first and txt last (the txt marks it complete)."""
    from .files import picks_frame

    per_mic_dir(out_dir).mkdir(parents=True, exist_ok=True)
    if "star" in formats:
        write_text(star_path(out_dir, picks.name), star_text({"": picks_frame(picks)}))
    write_text(txt_path(out_dir, picks.name), "\n".join([HEADER] + picks_lines(picks)) + "\n")
    error_path(out_dir, picks.name).unlink(missing_ok=True)


def write_error(out_dir, name: str, message: str) -> None:
    write_text(error_path(out_dir, name), message.rstrip() + "\n")


def reconcile_manifest(out_dir, settings: dict, micrographs: list[dict], overwrite: bool = False) -> dict:
    """Write or check ``predict.json``: same settings as any earlier run in this folder, micrographs united.

    Why: outputs from another model or threshold must never be skipped as "done" or merged in.
    """
    path = Path(out_dir) / MANIFEST
    listed = {m["name"]: m for m in micrographs}
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ShardError(f"{path}: unreadable ({exc}); remove it or use --overwrite") from exc
        if old.get("format") != FORMAT:
            raise ShardError(f"{path}: not a cryoal prediction folder (format {old.get('format')!r})")
        if old.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                             if settings.get(k) != old.get("settings", {}).get(k))
            raise ShardError(f"{out_dir} holds predictions made with other settings ({', '.join(changed)}); "
                             "use another --out-dir, or --overwrite to redo every micrograph")
        for m in old.get("micrographs", []):
            if m["name"] in listed and listed[m["name"]]["path"] != m["path"]:
                raise ShardError(f"micrograph name {m['name']} now points at {listed[m['name']]['path']}, "
                                 f"but {out_dir} has it from {m['path']}")
            listed.setdefault(m["name"], m)
    manifest = {"format": FORMAT, "settings": settings,
                "micrographs": [listed[n] for n in sorted(listed)]}
    if not path.exists() or json.loads(path.read_text()) != manifest:
        write_json(path, manifest)
    return manifest


def read_manifest(out_dir) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path} not found: is {out_dir} a `cryoal predict` output folder?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a cryoal prediction folder")
    return manifest


@dataclass
class MergeResult:
    micrographs: int
    picks: int
    missing: list[str]
    failed: list[str]
    scores: np.ndarray


def read_micrograph_lines(path: Path, name: str) -> tuple[list[str], list[tuple[float, float, float]]]:
    """The pick lines of one per-micrograph file and their (x, y, score); a damaged file is a ShardError
    naming it and the line (a replaced or truncated file must not merge as zero picks)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: unreadable ({exc}); delete it and run predict again to redo {name}") from exc
    all_lines = text.splitlines()
    redo = f"delete it and run predict again to redo micrograph {name}"
    if not all_lines or all_lines[0] != HEADER:
        raise ShardError(f"{path}: line 1 is not the header {HEADER!r} "
                         f"({(all_lines[0][:60] if all_lines else 'empty file')!r}); {redo}")
    if not text.endswith("\n"):
        raise ShardError(f"{path}: truncated (no newline at the end of line {len(all_lines)}); {redo}")
    body, rows = all_lines[1:], []
    for i, line in enumerate(body, 2):
        parts = line.split("\t")
        try:
            if len(parts) != 4 or parts[0] != name:
                raise ValueError
            x, y, sc = (float(v) for v in parts[1:])
            if not (np.isfinite(x) and np.isfinite(y) and 0.0 <= sc <= 1.0):
                raise ValueError
        except ValueError:
            raise ShardError(f"{path}: line {i} is not '{name}<tab>x<tab>y<tab>score' with numbers "
                             f"({line[:80]!r}); {redo}") from None
        rows.append((x, y, sc))
    return body, rows


def merge(out_dir, partial: bool = False) -> MergeResult:
    """Join the per-micrograph outputs of ``out_dir`` into picks.txt (+ picks.star, coordinates.star).

    Micrographs in name order; the lines are copied verbatim, so the result is byte-identical to
    a single process's.  Missing micrographs are an error unless ``partial``.
    """
    manifest = read_manifest(out_dir)
    formats = set(manifest["settings"].get("formats", ["txt"]))
    mics = manifest["micrographs"]
    missing = [m["name"] for m in mics if not is_complete(out_dir, m["name"], formats)]
    failed = [n for n in missing if error_path(out_dir, n).exists()]
    if missing and not partial:
        detail = f"; {len(failed)} could not be read (see {PER_MIC}/<name>_error.txt)" if failed else ""
        raise ShardError(f"{len(missing)} of {len(mics)} micrographs have no output yet "
                         f"(e.g. {', '.join(missing[:3])}){detail}: run the remaining shards, or merge --partial")
    done = [m for m in mics if m["name"] not in set(missing)]
    lines = [HEADER]
    star_rows: dict[str, list] = {"rlnMicrographName": [], "rlnCoordinateX": [], "rlnCoordinateY": [],
                                  "rlnAutopickFigureOfMerit": []}
    scores = []
    for m in done:
        body, rows = read_micrograph_lines(txt_path(out_dir, m["name"]), m["name"])
        lines += body
        for x, y, sc in rows:
            star_rows["rlnMicrographName"].append(m["path"])
            star_rows["rlnCoordinateX"].append(x)
            star_rows["rlnCoordinateY"].append(y)
            star_rows["rlnAutopickFigureOfMerit"].append(sc)
            scores.append(sc)
    out = Path(out_dir)
    write_text(out / "picks.txt", "\n".join(lines) + "\n")
    if "star" in formats:
        write_text(out / "picks.star", star_text({"particles": pd.DataFrame(star_rows)}))
        write_text(out / "coordinates.star", star_text({"coordinate_files": pd.DataFrame({
            "rlnMicrographName": [m["path"] for m in done],
            "rlnMicrographCoordinates": [f"{PER_MIC}/{m['name']}_picks.star" for m in done]})}))
    return MergeResult(len(done), len(scores), missing, failed, np.asarray(scores))
