#!/usr/bin/env python3
"""RELION External job entry point for cryoal_ext (active-learning particle picking).

In RELION: Job type "External", "External executable" = the full path of this file.  Because the
path contains "relion_", RELION appends --pipeline_control; cryoal_ext.relion accepts it.
The python3 found first on PATH (or the interpreter in the line above, if you edit it) must have
cryoal_ext installed; from a source checkout the package next to this folder is used.
"""
import os
import sys


def _fail(message: str) -> int:
    """Without the package RELION would wait forever: leave it a FAILURE marker and a message."""
    out = None
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--o" and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith("--o="):
            out = a[4:]
    print(f"cryoal_relion.py: error: {message}", file=sys.stderr, flush=True)
    if out:
        try:
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, "RELION_JOB_EXIT_FAILURE"), "w").close()
        except OSError:
            pass
    return 1


def _import():
    try:
        from cryoal_ext.relion.cli import run_cli
    except ImportError:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(here, "cryoal_ext")):
            raise
        sys.path.insert(0, here)  # a source checkout: relion_scripts/ sits next to cryoal_ext/
        from cryoal_ext.relion.cli import run_cli
    return run_cli


if __name__ == "__main__":
    try:
        run = _import()
    except ImportError as exc:
        sys.exit(_fail(f"cannot import cryoal_ext ({exc}); run RELION from an environment where it is installed "
                       f"(python: {sys.executable})"))
    sys.exit(run(sys.argv[1:], prog=os.path.basename(sys.argv[0])))
