"""The two pipeliner job types.  Each run is one command: the RELION External job's entry point.

The pipeliner runs jobs from the project folder, which is what the RELION job expects (paths are
project-relative), and it writes its own PIPELINER_JOB_EXIT_* markers; the RELION job's markers and
RELION_OUTPUT_NODES.star are left in the folder, harmless to the pipeliner and useful to RELION.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Union

from pipeliner.nodes import NODE_LOGFILE, NODE_MICROGRAPHCOORDSGROUP, NODE_PARAMSDATA
from pipeliner.pipeliner_job import PipelinerCommand, PipelinerJob, Ref
from pipeliner.results_display_objects import ResultsDisplayObject

from . import display
from .options import MODEL_KWDS, add_active_learning, add_predict, is_final, relion_job_arguments

ENTRY_POINT = ["python3", "-m", "cryoal_ext.relion"]
DOCS = "docs/pipeliner.md in the cryoal_ext source tree"

TOPAZ = Ref(
    authors=["Bepler T", "Morin A", "Rapp M", "Brasch J", "Shapiro L", "Noble AJ", "Berger B"],
    title="Positive-unlabeled convolutional neural networks for particle picking in cryo-electron micrographs.",
    journal="Nat. Methods",
    year="2019",
    volume="16",
    pages="1153-1160",
    doi="10.1038/s41592-019-0575-8",
)


def coords_kwds(kind: str) -> list[str]:
    """Our coordinate lists are RELION-format (so 'relion': Doppio shows them in its picks carousel)."""
    return ["relion", "cryoal", kind]


class CryoalJobBase(PipelinerJob):
    OUT_DIR = "AutoPick"
    CATEGORY_LABEL = "Automated Particle Picking"

    def __init__(self) -> None:
        super().__init__()
        self.jobinfo.version = "0.1"
        self.jobinfo.job_author = "cryoal_ext developers"
        self.jobinfo.documentation = DOCS
        self.jobinfo.references = [TOPAZ]
        # the command runs in this same interpreter: it needs the engine's heavy dependencies here
        missing = [m for m in ("torch", "topaz") if importlib.util.find_spec(m) is None]
        if missing:
            self.jobinfo.alternative_unavailable_reason = (
                f"{', '.join(missing)} not installed in {sys.executable}'s environment")

    def get_commands(self) -> List[PipelinerCommand]:
        args = relion_job_arguments(self.joboptions, self.output_dir)
        return [PipelinerCommand(ENTRY_POINT + args + self.parse_additional_args())]

    def _add_final_nodes(self) -> None:
        self.add_output_node("autopick.star", NODE_MICROGRAPHCOORDSGROUP, coords_kwds("autopick"))
        self.add_output_node("candidates.star", NODE_MICROGRAPHCOORDSGROUP, coords_kwds("candidates"))
        self.add_output_node("model.npz", NODE_PARAMSDATA, MODEL_KWDS)
        self.add_output_node("logfile.pdf", NODE_LOGFILE, ["cryoal"])

    def create_post_run_output_nodes(self) -> None:
        """The model of a labelling round exists only once there were labels to fit."""
        have = {n.name for n in self.output_nodes}
        if os.path.isfile(os.path.join(self.output_dir, "model.npz")) and \
                os.path.join(self.output_dir, "model.npz") not in have:
            self.add_output_node("model.npz", NODE_PARAMSDATA, MODEL_KWDS)

    def summary(self) -> dict:
        try:
            with open(Path(self.output_dir) / "summary.json") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def gather_metadata(self) -> Dict[str, Union[int, float, str, bool, dict, list, None]]:
        s = self.summary()
        return {k: s[k] for k in ("mode", "round", "labels", "queries", "picks", "candidates", "threshold",
                                  "suggested_threshold", "micrographs") if k in s}

    def create_results_display(self) -> Sequence[ResultsDisplayObject]:
        return display.results(self.output_dir)


class CryoalActiveLearningJob(CryoalJobBase):
    PROCESS_NAME = "cryoal.autopick.active_learning"

    def __init__(self) -> None:
        super().__init__()
        self.can_continue = True
        self.always_continue_in_schedule = True  # a schedule repeating this job runs the next round
        self.jobinfo.display_name = "Active-learning picking (a few labels per round)"
        self.jobinfo.short_desc = "Pick with Topaz features and a model fitted on your answers, round by round"
        self.jobinfo.long_desc = (
            "Computes Topaz's pretrained features once per micrograph and fits a small logistic regression"
            " on your labels. Each run is one round: it writes queries.star, the spots it is least sure"
            " about; review them with Doppio's pick editor or RELION's Manual picking (keep, delete, add),"
            " give the edited picks as 'Reviewed picks' and continue the job for the next round. A final"
            " run (or a threshold) writes autopick.star and candidates.star for every micrograph, ready"
            " for Extract, and model.npz for the predict job."
        )
        add_active_learning(self)

    def create_output_nodes(self) -> None:
        if is_final(self.joboptions):
            self._add_final_nodes()
            return
        self.add_output_node("queries.star", NODE_MICROGRAPHCOORDSGROUP, coords_kwds("queries"))
        self.add_output_node("autopick.star", NODE_MICROGRAPHCOORDSGROUP, coords_kwds("autopick"))
        self.add_output_node("logfile.pdf", NODE_LOGFILE, ["cryoal"])


class CryoalPredictJob(CryoalJobBase):
    PROCESS_NAME = "cryoal.autopick.predict"

    def __init__(self) -> None:
        super().__init__()
        self.can_continue = True  # e.g. to pick again at another threshold or on more micrographs
        self.jobinfo.display_name = "Pick with a saved active-learning model"
        self.jobinfo.short_desc = "Apply a model.npz from an active-learning job to every micrograph"
        self.jobinfo.long_desc = (
            "Picks every micrograph with a model saved by an active-learning job: no labels, no fitting."
            " Writes autopick.star (picks at the threshold) and candidates.star (every candidate with its"
            " probability as the figure of merit) for Extract."
        )
        add_predict(self)

    def create_output_nodes(self) -> None:
        self._add_final_nodes()

