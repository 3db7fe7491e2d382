"""The job options of our pipeliner jobs, and how each becomes an argument of the RELION job.

Each option maps to exactly one ``--flag`` of ``python -m cryoal_ext.relion`` (``FLAGS``), so the
pipeliner job has no settings of its own that the RELION job does not understand.
"""
from __future__ import annotations

from typing import Callable

from pipeliner import user_settings
from pipeliner.job_options import (
    BooleanJobOption,
    FileDescription,
    FloatJobOption,
    InputNodeJobOption,
    IntJobOption,
    JobOption,
    MultipleChoiceJobOption,
    StringJobOption,
)
from pipeliner.nodes import (
    NODE_MICROGRAPHCOORDSGROUP,
    NODE_MICROGRAPHGROUPMETADATA,
    NODE_PARAMSDATA,
    NODE_PARTICLEGROUPMETADATA,
)

from ..features import DEFAULT_FEATURE_MODEL, FEATURE_MODELS
from ..recipes import RECIPES

MODEL_KWDS = ["cryoal", "model"]
RUNNING = "Running options"

# job option name -> the RELION job's flag
FLAGS = {
    "input_mics": "--in_mics",
    "input_coords": "--in_coords",
    "input_parts": "--in_parts",
    "input_model": "--model",
    "diameter": "--diameter",
    "batch": "--batch",
    "train_micrographs": "--train_micrographs",
    "feature_model": "--feature_model",
    "recipe": "--recipe",
    "audits": "--audits",
    "seed": "--seed",
    "do_predict": "--predict",
    "threshold": "--threshold",
    "min_fom": "--min_fom",
    "overlays": "--overlays",
    "device": "--device",
    "cache_dir": "--cache_dir",
    "nr_threads": "--j",
}


def micrographs() -> InputNodeJobOption:
    return InputNodeJobOption(
        label="Input micrographs:",
        node_type=NODE_MICROGRAPHGROUPMETADATA,
        node_kwds=["relion"],
        pattern=FileDescription("Micrographs STAR file", [".star"]),
        help_text=("Micrographs STAR file of a MotionCorr, CtfFind or Select job (rlnMicrographName, optics"
                   " group pixel size). Labels are kept by micrograph name, so the list may grow between rounds."),
        is_required=True,
        in_continue=True,
    )


def diameter(required: bool) -> FloatJobOption:
    how = ("Required: there is no safe default, the proposals and picks are spaced by it." if required
           else "Leave blank to use the diameter stored with the model.")
    return FloatJobOption(
        label="Particle diameter (A):",
        default_value=None,
        suggested_min=50,
        suggested_max=600,
        step_value=10,
        hard_min=1,
        help_text=f"Longest particle diameter in Angstrom. {how}",
        is_required=required,
        in_continue=True,
    )


def threshold(what: str) -> FloatJobOption:
    return FloatJobOption(
        label="Pick probability threshold:",
        default_value=None,
        suggested_min=0.05,
        suggested_max=0.95,
        step_value=0.05,
        hard_min=0.0,
        hard_max=1.0,
        help_text=(f"Picks with a probability (written as rlnAutopickFigureOfMerit) of at least this go to"
                   f" autopick.star. Blank: the threshold the job suggests from the score distribution. {what}"
                   " candidates.star keeps every candidate above 'Lowest FOM kept', so Extract's FOM"
                   " threshold can change it later."),
        in_continue=True,
    )


def add_common_running(job, feature_model: bool = True) -> None:
    """Device, feature model, cache, threads, pictures: shared by both job types."""
    jo = job.joboptions
    if feature_model:
        jo["feature_model"] = MultipleChoiceJobOption(
            label="Feature model:",
            choices=list(FEATURE_MODELS),
            default_value=DEFAULT_FEATURE_MODEL,
            help_text=("Topaz's pretrained backbone whose features the model learns on; '+viewsN' averages N"
                       " rotated/mirrored copies (better picks, N times the feature time). resnet16_u32 is the"
                       " published one view and the fastest. Fixed for the life of a session: the saved model"
                       " belongs to it."),
        )
    jo["min_fom"] = FloatJobOption(
        label="Lowest FOM kept:",
        default_value=0.01,
        hard_min=0.0,
        hard_max=1.0,
        step_value=0.01,
        help_text="Lowest probability written to candidates.star in a final run.",
        in_continue=True,
    )
    jo["overlays"] = IntJobOption(
        label="Micrographs drawn:",
        default_value=4,
        hard_min=0,
        suggested_max=12,
        step_value=1,
        help_text="How many micrographs get a pick-overlay picture per run (shown in the job's results).",
        in_continue=True,
    )
    jo["device"] = StringJobOption(
        label="Device:",
        default_value="",
        help_text="torch device for the features: cpu, cuda or cuda:1. Blank: cuda when present, else cpu.",
        validation_regex=r"^\s*(cpu|cuda(:[0-9]+)?|mps)?\s*$",
        regex_error_message="cpu, cuda, cuda:<id> or mps",
        in_continue=True,
        jobop_group=RUNNING,
    )
    jo["cache_dir"] = StringJobOption(
        label="Feature cache folder:",
        default_value="",
        help_text=("Where computed features are kept for the next round. Blank: $CRYOAL_CACHE when set, else"
                   " feature_cache/ in the job folder."),
        in_continue=True,
        jobop_group=RUNNING,
    )
    jo["nr_threads"] = IntJobOption(
        label="Number of CPU threads:",
        default_value=None,
        hard_min=1,
        suggested_max=user_settings.get_thread_max(),
        step_value=1,
        help_text="torch CPU threads. Blank: torch's default (all cores).",
        in_continue=True,
        jobop_group=RUNNING,
    )
    job.get_runtab_options(addtl_args=True)


def add_active_learning(job) -> None:
    """The options of ``cryoal.autopick.active_learning``."""
    jo = job.joboptions
    jo["input_mics"] = micrographs()
    jo["input_coords"] = InputNodeJobOption(
        label="Reviewed picks (labels):",
        node_type=NODE_MICROGRAPHCOORDSGROUP,
        node_kwds=["relion"],
        pattern=FileDescription("Coordinates list STAR file", [".star"]),
        help_text=("A coordinate list with your answers: the picked_particles.star of a Doppio pick-editing"
                   " job or a RELION Manual picking job opened on this job's queries.star. Kept proposal ="
                   " positive, deleted = negative, added = positive, red (RELION) = negative; a micrograph"
                   " left unopened gives no labels. Edits saved in place into this job's queries files are"
                   " read without this option. Picks that are not a review of our queries (e.g. a Manual"
                   " picking job from scratch) are taken as positives only."),
        in_continue=True,
    )
    jo["input_parts"] = InputNodeJobOption(
        label="Good particles (positives):",
        node_type=NODE_PARTICLEGROUPMETADATA,
        node_kwds=["relion"],
        pattern=FileDescription("Particles STAR file", [".star"]),
        help_text="Optional: particles you trust (e.g. from good 2D classes); every one becomes a positive label.",
        in_continue=True,
    )
    jo["diameter"] = diameter(required=True)
    jo["batch"] = IntJobOption(
        label="Proposals per round:",
        default_value=10,
        hard_min=1,
        suggested_max=100,
        step_value=1,
        help_text="How many spots the job asks you about each round (queries.star).",
        in_continue=True,
    )
    jo["train_micrographs"] = IntJobOption(
        label="Micrographs to label:",
        default_value=2,
        hard_min=1,
        suggested_max=12,
        step_value=1,
        help_text=("How many micrographs the proposals are drawn from (chosen once, by the seed). Raising it"
                   " later adds micrographs, it never drops one with labels."),
        in_continue=True,
    )
    jo["recipe"] = MultipleChoiceJobOption(
        label="Engine recipe:",
        choices=[n for n, r in RECIPES.items() if not r.audits_apart],  # audits apart: `cryoal round` only, so far
        default_value="default",
        help_text="'default': our tuned settings (from 50 answers on, 3 of each batch are picks to check, for "
                  "calibrated probabilities); 'seed': the published method as it was described; "
                  "'head': the default until issue 16, its weights held towards Topaz's head; "
                  "'evidence': 'head' with its prior's strength chosen each round by the answers' evidence.",
    )
    jo["audits"] = IntJobOption(
        label="Picks to check per round:",
        default_value=None,
        hard_min=0,
        suggested_max=9,
        step_value=1,
        help_text=("From 50 answers on, this many of each round's proposals are the model's own picks, to keep"
                   " or delete as any other; they calibrate the probabilities, the suggested threshold and the"
                   " expected particle count. Blank: the recipe's (3 for 'default'); 0: none (every proposal an"
                   " uncertain one). 6 was measured and gave no surer count. Less than 'Proposals per round'."),
        in_continue=True,
    )
    jo["seed"] = IntJobOption(
        label="Random seed:",
        default_value=0,
        hard_min=0,
        step_value=1,
        help_text="Chooses the micrographs to label; the same seed gives the same session.",
    )
    jo["do_predict"] = BooleanJobOption(
        label="Final run: pick every micrograph?",
        default_value=False,
        help_text=("No: a labelling round (queries.star to review, picks on the labelled micrographs). Yes:"
                   " refit on all labels and write autopick.star and candidates.star for every micrograph,"
                   " for Extract. Setting a threshold also makes the run final."),
        in_continue=True,
    )
    jo["threshold"] = threshold("A value here makes the run final.")
    add_common_running(job)
    job.set_joboption_order(["input_mics", "input_coords", "input_parts", "diameter", "batch",
                             "train_micrographs", "do_predict", "threshold", "feature_model", "recipe", "audits",
                             "seed"])


def add_predict(job) -> None:
    """The options of ``cryoal.autopick.predict``."""
    jo = job.joboptions
    jo["input_mics"] = micrographs()
    jo["input_model"] = InputNodeJobOption(
        label="Model:",
        node_type=NODE_PARAMSDATA,
        node_kwds=MODEL_KWDS,
        pattern=FileDescription("cryoal model", [".npz"]),
        help_text=("model.npz of an active-learning job (its model.json must sit beside it). Its feature model,"
                   " working pixel size and particle diameter are used."),
        is_required=True,
        in_continue=True,
    )
    jo["diameter"] = diameter(required=False)
    jo["threshold"] = threshold("")
    add_common_running(job, feature_model=False)
    job.set_joboption_order(["input_mics", "input_model", "diameter", "threshold"])


def _value(opt: JobOption) -> str | None:
    """The option's value as an argument, or None when it is blank (the RELION job's default applies)."""
    if opt.is_blank:
        return None
    if isinstance(opt, BooleanJobOption):
        return "true" if opt.get_boolean() else None
    if isinstance(opt, (FloatJobOption, IntJobOption)):
        n = opt.get_number()
        return None if n is None else f"{n:g}"
    return opt.get_string().strip() or None


def relion_job_arguments(joboptions: dict[str, JobOption], outdir: str,
                         skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """``--o <outdir>`` and one ``--flag value`` per non-blank option, in FLAGS order."""
    args = ["--o", outdir]
    for name, flag in FLAGS.items():
        opt = joboptions.get(name)
        if opt is None or skip(name):
            continue
        v = _value(opt)
        if v is not None:
            args += [flag, v]
    return args


def is_final(joboptions: dict[str, JobOption]) -> bool:
    """Does this run write picks for every micrograph (the RELION job's rule: predict, a threshold or a model)?"""
    jo = joboptions
    if "input_model" in jo:
        return True
    return bool((jo["do_predict"].value is True) or not jo["threshold"].is_blank)


__all__ = ["FLAGS", "MODEL_KWDS", "add_active_learning", "add_predict", "relion_job_arguments", "is_final"]
