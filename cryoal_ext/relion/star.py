"""RELION file conventions (RELION 4.0 and 5.0; reads 3.0/3.1 inputs): STAR files, versions, job paths.

The base of the RELION file modules (``micrographs``, ``coordinates``, ``markers`` build on it):
reading STAR files with errors that name the file, version detection and node type labels, and
RELION's rules for job folders and per-micrograph output names.  No engine logic here.  The facts
come from RELION's sources (see ``../shared/docs/integration-conventions.md``); where RELION's
docs and sources disagree, the sources win (e.g. RELION 4/5 read the STRING node type label, not
the old integer type).  All STAR I/O goes through ``starfile``; every write is atomic.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import starfile

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


class RelionError(ValueError):
    """A RELION input that cannot be used; the message names the file and the problem."""


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


# --- job folders and output names -------------------------------------------------------------
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


def _strip_ext(name: str) -> str:
    base, ext = os.path.splitext(name)
    return base if ext and "/" not in ext else name
