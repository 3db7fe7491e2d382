"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse
import os

from ..features import DEFAULT_FEATURE_MODEL, FEATURE_MODELS
from ..validate import nonnegative_int, pixel_size, positive_int, positive_number


def default_cache() -> str:
    return os.environ.get("CRYOAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cryoal_ext", "features"))


class StoreGiven(argparse.Action):
    """Store the value and mark it as given (``<dest>_given``), so a command can tell it from the default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def given(args, dest: str) -> bool:
    """Whether the user typed the option behind ``dest`` (not just its default)."""
    return bool(getattr(args, f"{dest}_given", False))


def add_size_arguments(p: argparse.ArgumentParser) -> None:
    """The particle size, one of two ways, each a finite number > 0."""
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--radius-px", type=positive_number, help="particle radius in micrograph pixels")
    size.add_argument("--diameter-A", type=positive_number, help="particle diameter in Angstrom")


AUDITS_HELP = ("questions of each batch about the model's own picks, from 50 answers on; they calibrate the "
               "probabilities and the particle count (default: the recipe's, 3 for default; 0: none; 6 was "
               "measured and is no better: README 'More audits')")


def add_audits_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audits", type=nonnegative_int, default=None, help=AUDITS_HELP)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--feature-model", default=DEFAULT_FEATURE_MODEL, choices=FEATURE_MODELS, metavar="MODEL",
                   action=StoreGiven,
                   help="Topaz pretrained backbone, +viewsN to average its features over N rotated/flipped "
                        f"copies (1 view is N times faster on a CPU; default %(default)s); one of {', '.join(FEATURE_MODELS)}")
    g.add_argument("--working-pixel-size", type=positive_number, default=8.0,
                   help="A/px after Fourier cropping (default 8)")
    g.add_argument("--pixel-size", type=pixel_size, default=None,
                   help="override the MRC header pixel size (A, 0.1 to 50)")
    g.add_argument("--cache-dir", default=default_cache(), help="feature cache folder (default %(default)s; env CRYOAL_CACHE)")
    g.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: cuda when present)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def apply_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def check_inputs(args, files, folders: dict[str, str | os.PathLike | None], batch: int = 1,
                 feature_model: str | None = None, skip_bad_pixel_size: bool = False) -> None:
    """Refuse bad input before any slow work or any write: unwritable folders (``{what: folder}``), a particle
    that does not fit the micrographs, absurd pixel sizes, a working image too large for memory."""
    from ..validate import SizeRules, check_micrograph_files, check_writable

    for what, folder in folders.items():
        check_writable(folder, what)
    rules = SizeRules(radius_px=getattr(args, "radius_px", None), diameter_A=getattr(args, "diameter_A", None),
                      working_pixel_size=args.working_pixel_size,
                      feature_model=feature_model or args.feature_model, batch=batch)
    check_micrograph_files(files, args.pixel_size, rules, skip_bad_pixel_size=skip_bad_pixel_size)
