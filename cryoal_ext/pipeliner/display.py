"""Results display objects for Doppio, built only from files the RELION job already wrote.

summary.json says what the last run was; rounds/<round_NNN|final_NNN>/ holds its overlay and
histogram pictures; session.json's history gives the labels per round.  Nothing is recomputed, so
the display is quick and always matches what the job did.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pipeliner.display_tools import create_results_display_object
from pipeliner.results_display_objects import ResultsDisplayObject

from ..calibration import CountEstimate

MAX_OVERLAYS = 3


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def round_folder(job_dir: str, summary: dict) -> Path:
    """Where the last run put its pictures (the RELION job's layout)."""
    kind = "final" if summary.get("mode") == "predict" else "round"
    return Path(job_dir) / "rounds" / f"{kind}_{int(summary.get('round', 0)):03d}"


def overlays(job_dir: str, summary: dict) -> list[ResultsDisplayObject]:
    folder = round_folder(job_dir, summary)
    picks = str(Path(job_dir) / "autopick.star")
    out = []
    for png in sorted(folder.glob("overlay_*.png"))[:MAX_OVERLAYS]:
        mic = png.stem[len("overlay_"):]
        out.append(create_results_display_object(
            "image",
            title=f"Picks on {mic}",
            image_path=str(png),
            image_desc=("blue circles: picks at the threshold; yellow: proposals to review; green + / red x:"
                        " your positive / negative labels"),
            associated_data=[picks],
        ))
    return out


def fom_values(coordinate_list: Path) -> list[float]:
    """rlnAutopickFigureOfMerit of every coordinate in a coordinate list (empty when there is none)."""
    from ..relion.star import RelionError, read_star
    from ..relion.coordinates import read_coordinate_list

    values: list[float] = []
    try:
        files = read_coordinate_list(coordinate_list)
    except (RelionError, OSError):
        return values
    for f in files.values():
        if not f.exists() or f.stat().st_size == 0:
            continue
        for table in read_star(f).values():
            if hasattr(table, "columns") and "rlnAutopickFigureOfMerit" in table.columns:
                values += [float(v) for v in table["rlnAutopickFigureOfMerit"]]
                break
    return values


def score_histograms(job_dir: str, summary: dict) -> list[ResultsDisplayObject]:
    """Our own picture of all candidate scores (with the threshold), and the FOMs written, binned by Doppio."""
    out = []
    png = round_folder(job_dir, summary) / "scores.png"
    thr = summary.get("threshold", summary.get("suggested_threshold"))
    if png.exists():
        out.append(create_results_display_object(
            "image",
            title="Pick probability of every candidate",
            image_path=str(png),
            image_desc=f"all candidate peaks; threshold {thr}",
            associated_data=[str(Path(job_dir) / "summary.json")],
        ))
    name = "candidates.star" if summary.get("mode") == "predict" else "autopick.star"
    lst = Path(job_dir) / name
    values = fom_values(lst)
    if values:
        out.append(create_results_display_object(
            "histogram",
            title=f"{len(values)} coordinates in {name}",
            data_to_bin=values,
            bin_edges=list(np.linspace(0.0, 1.0, 21)),
            xlabel="probability (rlnAutopickFigureOfMerit)",
            ylabel="coordinates",
            associated_data=[str(lst)],
        ))
    return out


def expected_particles(job_dir: str, summary: dict) -> list[ResultsDisplayObject]:
    """A final run's own estimate of the particle count and its range (calibration.count_estimate)."""
    est = CountEstimate.from_dict(summary.get("expected_particles"))
    if est is None:
        return []
    text = (f"{est.expected:.0f} particles expected ({est.range_text}): the sum of the pick probabilities, "
            f"against {summary.get('picks', '?')} picks kept at the threshold")
    return [create_results_display_object("text", title="Particles expected", display_data=text,
                                          associated_data=[str(Path(job_dir) / "summary.json")])]


def label_rows(history: list[dict]) -> list[list[str]]:
    """One row per run: what it learned from and what it wrote."""
    rows = []
    for n, ev in enumerate(history, start=1):
        mode = str(ev.get("mode", "")).replace("relion-", "")
        labels, pos = ev.get("labels"), ev.get("positives")
        neg = labels - pos if isinstance(labels, int) and isinstance(pos, int) else None
        rows.append([str(n), str(ev.get("round", "")), mode,
                     "" if labels is None else str(labels), "" if pos is None else str(pos),
                     "" if neg is None else str(neg), str(ev.get("queries", "")),
                     str(ev.get("threshold", "")), str(ev.get("picks", ""))])
    return rows


def label_counts(job_dir: str) -> list[ResultsDisplayObject]:
    session = Path(job_dir) / "session.json"
    state = _read_json(session) or {}
    history = [ev for ev in state.get("history", []) if isinstance(ev, dict)]
    if not history:
        return []
    out = [create_results_display_object(
        "table",
        title="Labels per round",
        headers=["run", "round", "mode", "labels", "positive", "negative", "queries", "threshold", "picks"],
        table_data=label_rows(history),
        header_tooltips=["run of this job", "labelling round", "round: proposals; predict: final picks",
                         "labels the model was fitted on", "positive labels", "negative labels",
                         "proposals written for review", "probability threshold of autopick.star",
                         "picks written (final runs)"],
        associated_data=[str(session)],
    )]
    rounds = [ev for ev in history if isinstance(ev.get("labels"), int) and isinstance(ev.get("positives"), int)]
    if len(rounds) >= 2:
        x = [int(ev.get("round", i)) for i, ev in enumerate(rounds)]
        out.append(create_results_display_object(
            "graph",
            title="Labels per round",
            xvalues=[x, x],
            yvalues=[[ev["positives"] for ev in rounds], [ev["labels"] - ev["positives"] for ev in rounds]],
            data_series_labels=["positive", "negative"],
            xaxis_label="round",
            yaxis_label="labels",
            modes=["lines+markers", "lines+markers"],
            associated_data=[str(session)],
        ))
    return out


def results(job_dir: str) -> list[ResultsDisplayObject]:
    """Everything Doppio shows for one of our jobs, newest run first."""
    summary = _read_json(Path(job_dir) / "summary.json")
    if summary is None:
        return [create_results_display_object(
            "pending", message="No results yet", reason=f"{job_dir}summary.json is not written yet")]
    return (expected_particles(job_dir, summary) + overlays(job_dir, summary) + score_histograms(job_dir, summary)
            + label_counts(job_dir))
