"""RELION's job protocol: exit markers, the abort request, output nodes, the GUI refresh signal.

RELION ignores an External job's exit code: it polls the job folder for marker files and reads
``RELION_OUTPUT_NODES.star`` once SUCCESS appears.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..atomic import write_text
from ..files import write_star
from .star import NODE_LABELS, VERSION_TAG, job_dir

# --- marker names (RELION ignores the exit code and polls for these files) --------------------
SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
#: Created by every pipeline write; the GUI's refresh timer looks for finished jobs only while it
#: exists (RELION 4.0 and 5.0 gui_mainwindow.cpp, Gui_Timer_CB), and removes it afterwards.
PIPELINE_HAS_CHANGED = ".pipeline_has_changed"


class JobAborted(Exception):
    """The user asked RELION to abort the job (RELION_JOB_ABORT_NOW appeared)."""


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
