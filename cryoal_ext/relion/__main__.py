"""``python -m cryoal_ext.relion``: the RELION External job (as relion_scripts/cryoal_relion.py runs it)."""
import sys

from .cli import run_cli

sys.exit(run_cli())
