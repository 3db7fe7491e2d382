"""A labelling session kept in a folder: labels, model, rounds, proposals shown.

RELION and cryoSPARC edit picks in place or hand back a new set, never a list of answers, so
every round keeps its own copy of the proposals it showed; the next round diffs the user's
edited picks against that copy.  Everything here is plain TSV/JSON and written atomically;
a crashed or repeated run resumes from the folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .acquisition import Proposal
from .atomic import atomic_path, write_json
from .labels import Label, LabelStore

STATE_FORMAT = "cryoal_ext.session/1"


@dataclass
class Edited:
    """A user's picks for one micrograph after review: coordinates and, where the host has one, a label."""

    x: np.ndarray
    y: np.ndarray
    label: np.ndarray | None = None  # 1 positive, 0 negative; None: all positive


def diff_edits(shown: list[Proposal], edited: dict[str, Edited], radius_px: float, round_: int,
               match_px: float | None = None, source: str = "review") -> list[Label]:
    """Labels from a review: kept proposal -> positive, deleted -> negative, added pick -> positive.

    Only micrographs present in ``edited`` count as reviewed.  A proposal deleted with a new pick
    added within the particle radius was re-centred by the user: the new pick is the positive and
    the proposal is not turned into a negative.  Explicit labels (e.g. RELION's red selection
    type) win over the diff.
    """
    match_px = match_px if match_px is not None else max(1.0, 0.2 * radius_px)
    out: list[Label] = []
    by_mic: dict[str, list[Proposal]] = {}
    for p in shown:
        by_mic.setdefault(p.micrograph, []).append(p)
    for name, ed in edited.items():
        ex, ey = np.asarray(ed.x, float), np.asarray(ed.y, float)
        elab = np.ones(ex.size, int) if ed.label is None else np.asarray(ed.label, int)
        props = by_mic.get(name, [])
        used = np.zeros(ex.size, bool)
        tree = cKDTree(np.c_[ex, ey]) if ex.size else None
        deleted = []
        for p in props:
            j = None
            if tree is not None:
                cand = [k for k in tree.query_ball_point([p.x, p.y], match_px) if not used[k]]
                if cand:
                    j = min(cand, key=lambda k: (ex[k] - p.x) ** 2 + (ey[k] - p.y) ** 2)
            if j is None:
                deleted.append(p)
            else:
                used[j] = True
                out.append(Label(name, float(p.x), float(p.y), int(elab[j]), source, round_))
        added = np.flatnonzero(~used)
        for p in deleted:
            near = [k for k in added if elab[k] == 1 and (ex[k] - p.x) ** 2 + (ey[k] - p.y) ** 2 <= radius_px ** 2]
            if not near:
                out.append(Label(name, float(p.x), float(p.y), 0, source, round_))
        out += [Label(name, float(ex[k]), float(ey[k]), int(elab[k]), source, round_) for k in added]
    return out


class Session:
    """The folder of one labelling session (a RELION job folder, a cryoSPARC job's work folder, ...)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.labels = LabelStore(self.folder / "labels.tsv")
        self.state_path = self.folder / "session.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {
            "format": STATE_FORMAT, "round": 0, "history": []}

    @property
    def round(self) -> int:
        return int(self.state["round"])

    @property
    def model_path(self) -> Path:
        return self.folder / "model.npz"

    def save_state(self, **updates) -> None:
        self.state.update(updates)
        write_json(self.state_path, self.state)

    def proposals_path(self, round_: int) -> Path:
        return self.folder / "proposals" / f"round_{round_:03d}.tsv"

    def save_proposals(self, round_: int, proposals: list[Proposal]) -> Path:
        path = self.proposals_path(round_)
        df = pd.DataFrame([p.__dict__ for p in proposals], columns=["micrograph", "x", "y", "score", "kind"])
        with atomic_path(path) as tmp:
            df.to_csv(tmp, sep="\t", index=False, float_format="%.3f")
        return path

    def load_proposals(self, round_: int) -> list[Proposal]:
        path = self.proposals_path(round_)
        if not path.exists():
            return []
        df = pd.read_csv(path, sep="\t", dtype={"micrograph": str, "kind": str})
        return [Proposal(str(r.micrograph), float(r.x), float(r.y), float(r.score), str(r.kind))
                for r in df.itertuples(index=False)]

    def record(self, **event) -> None:
        self.state.setdefault("history", []).append(event)
        self.save_state()
