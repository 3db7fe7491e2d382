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
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from ..atomic import LockedError, folder_lock
from .job import Job, Log
from .markers import FAILURE, JobAborted, SUCCESS, clear_exit_markers, finish_aborted, signal_pipeline_changed, write_marker
from .star import RelionError
from .settings import JOB_PREFIX, _text, add_arguments, settings_from_args

# --- entry points ------------------------------------------------------------------------------
def main(args) -> int:
    """Run one job; RELION only looks at the exit marker files, the exit code is for humans."""
    log = Log()
    try:
        s = settings_from_args(args)
    except RelionError as exc:
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
        clear_exit_markers(s.outdir)
        log(f"cryoal_ext RELION External job in {s.outdir} (pid {os.getpid()}, cwd {os.getcwd()})")
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, *a, **k: log.warn(str(m))
            Job(s, log).run()
        write_marker(s.outdir, SUCCESS)  # last: RELION reads the nodes as soon as it sees this
        signal_pipeline_changed()  # an open RELION GUI shows the job finished without a click
        log(f"done in {time.perf_counter() - log.t0:.1f} s")
        return 0
    except JobAborted:
        finish_aborted(s.outdir)
        signal_pipeline_changed()
        log("aborted on request (RELION_JOB_ABORT_NOW); labels given so far are kept")
        print(f"{JOB_PREFIX}: aborted by the user", file=sys.stderr, flush=True)
        return 1
    except BaseException as exc:  # noqa: BLE001 - any failure must leave RELION a FAILURE marker
        _fail_marker(s.outdir)
        expected = isinstance(exc, (RelionError, ValueError, FileNotFoundError, RuntimeError))
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
        write_marker(outdir, FAILURE)
    except OSError as exc:
        print(f"{JOB_PREFIX}: could not write {FAILURE} in {outdir}: {exc}", file=sys.stderr, flush=True)
        return
    signal_pipeline_changed()


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
