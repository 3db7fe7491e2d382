"""``cryoal``: one command, Topaz-style subcommands."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    # name: (module, help)
    "benchmark": ("cryoal_ext.commands.benchmark", "oracle benchmark on micrographs with ground truth (AP vs labels)"),
    "round": ("cryoal_ext.commands.round", "one active-learning round: labels in, model and new proposals out"),
    "predict": ("cryoal_ext.commands.predict", "pick micrographs with a trained model (or the pretrained one)"),
    "evaluate": ("cryoal_ext.commands.evaluate", "AP / precision-recall of a picks file against ground truth"),
    "features": ("cryoal_ext.commands.features", "compute and cache Topaz features for micrographs"),
    "example": ("cryoal_ext.commands.example", "run the whole loop on the bundled example data"),
    "relion": ("cryoal_ext.relion.cli", "RELION External job (what relion_scripts/cryoal_relion.py runs)"),
    "cryosparc": ("cryoal_ext.cryosparc.cli", "cryoSPARC external job, or offline on .cs files"),
    "merge": ("cryoal_ext.commands.merge", "join the outputs of --shard i/N prediction runs"),
    "session": ("cryoal_ext.commands.session", "check a session folder, or rebuild its session.json (--repair)"),
}


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: a bad option value is bad input like any other, so it exits 1 (argparse says 2)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cryoal", description="Active-learning particle picking on Topaz features.")
    parser.add_argument("--version", action="version", version=f"cryoal_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("cryoal_ext"):
                continue  # front end not installed in this build
            raise
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"cryoal {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:  # a last net: the commands check their folders before slow work
        if getattr(args, "debug", False):
            raise
        print(f"cryoal {args.command}: error: permission denied: {exc.filename or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
