"""User labels: (micrograph, x, y, positive|negative) in original micrograph pixels.

The label file only ever grows: new labels are appended and the file is rewritten atomically,
so a crash or a bad input never loses a label already given.  When two labels land on the same
spot the newest wins for training, and the conflict is logged.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .atomic import atomic_path

log = logging.getLogger("cryoal_ext.labels")

RETRACTED = -1  # a row that withdraws the label at its spot (a deletion in an interactive front end)
COLUMNS = ["micrograph", "x", "y", "label", "source", "round", "time"]


class LabelFileError(ValueError):
    pass


@dataclass(frozen=True)
class Label:
    micrograph: str
    x: float
    y: float
    label: int  # 1 positive, 0 negative
    source: str = "user"
    round: int = 0
    time: float = 0.0


class LabelStore:
    """Append-only label file (TSV with a header), plus the conflict-resolved view used for training."""

    def __init__(self, path: str | os.PathLike | None = None, same_spot_px: float = 2.0,
                 on_save: Callable[["LabelStore"], None] | None = None):
        self.path = Path(path) if path else None
        self.same_spot_px = float(same_spot_px)
        self.on_save = on_save  # the session records how many rows it has seen (a shorter file is refused)
        self.labels: list[Label] = []
        if self.path is not None and self.path.exists():
            self.labels = self._read(self.path)

    @staticmethod
    def _read(path: Path) -> list[Label]:
        try:
            df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except Exception as exc:
            raise LabelFileError(f"{path}: cannot read label file ({exc})") from exc
        missing = {"micrograph", "x", "y", "label"} - set(df.columns)
        if missing:
            raise LabelFileError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        num = {}
        for col in ("x", "y", "label", "round", "time"):
            if col not in df.columns:
                continue
            v = pd.to_numeric(df[col], errors="coerce")
            bad = ~np.isfinite(v.to_numpy(float))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise LabelFileError(f"{path}, line {i + 2}: column {col!r} is {df[col].iloc[i]!r}, not a number")
            num[col] = v.to_numpy(float)
        bad = ~np.isin(num["label"], [0, 1, RETRACTED])
        if bad.any():
            raise LabelFileError(f"{path}, line {int(np.flatnonzero(bad)[0]) + 2}: label must be 0, 1 or "
                                 f"{RETRACTED} (retracted)")
        n = len(df)
        src = df["source"].tolist() if "source" in df.columns else ["user"] * n
        rnd = num.get("round", np.zeros(n))
        tim = num.get("time", np.zeros(n))
        return [Label(str(m), float(x), float(y), int(lab), str(s), int(r), float(t))
                for m, x, y, lab, s, r, t in zip(df["micrograph"], num["x"], num["y"], num["label"], src, rnd, tim)]

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, new: list[Label], save: bool = True) -> int:
        """Append labels (exact duplicates of the newest label at a spot are skipped); returns how many were added."""
        current = {(l.micrograph, round(l.x, 2), round(l.y, 2)): l.label for l in self.effective()}
        added = []
        now = time.time()
        for lab in new:
            key = (lab.micrograph, round(lab.x, 2), round(lab.y, 2))
            if current.get(key) == lab.label:
                continue
            added.append(lab if lab.time else Label(lab.micrograph, lab.x, lab.y, lab.label, lab.source, lab.round, now))
            current[key] = lab.label
        self.labels.extend(added)
        if added and save:
            self.save()
        return len(added)

    def remove(self, micrograph: str, x: float, y: float, within_px: float | None = None, save: bool = True) -> int:
        """Retract the current label(s) of ``micrograph`` within ``within_px`` of (x, y); returns how many.

        Append-only like everything else: a retraction row (label ``RETRACTED``) is added at each
        retracted label's spot, so the label drops out of :meth:`effective` (newest wins) while the
        history, and the label itself, stay in the file.  A later label at that spot counts again.
        """
        r2 = (self.same_spot_px if within_px is None else float(within_px)) ** 2
        now = time.time()
        gone = [Label(l.micrograph, l.x, l.y, RETRACTED, "retracted", l.round, now) for l in self.effective()
                if l.micrograph == micrograph and (l.x - x) ** 2 + (l.y - y) ** 2 <= r2]
        self.labels.extend(gone)
        if gone and save:
            self.save()
        return len(gone)

    def save(self) -> None:
        if self.path is None:
            return
        df = pd.DataFrame([l.__dict__ for l in self.labels], columns=COLUMNS)
        with atomic_path(self.path) as tmp:
            df.to_csv(tmp, sep="\t", index=False, float_format="%.2f")
        if self.on_save is not None:
            self.on_save(self)

    def effective(self) -> list[Label]:
        """One label per spot, the newest winning; conflicts (positive vs negative) are logged."""
        kept: list[Label] = []
        by_mic: dict[str, list[int]] = {}
        r2 = self.same_spot_px ** 2
        for lab in self.labels:
            idx = by_mic.setdefault(lab.micrograph, [])
            replaced = False
            for j in idx:
                old = kept[j]
                if old is not None and (old.x - lab.x) ** 2 + (old.y - lab.y) ** 2 <= r2:
                    if old.label != lab.label and RETRACTED not in (old.label, lab.label):
                        log.warning("conflicting labels at %s (%.1f, %.1f): %s then %s; the newest wins",
                                    lab.micrograph, lab.x, lab.y, _word(old.label), _word(lab.label))
                    kept[j] = None
                    replaced = True
            if replaced:
                idx[:] = [j for j in idx if kept[j] is not None]
            idx.append(len(kept))
            kept.append(lab)
        return [l for l in kept if l is not None and l.label != RETRACTED]

    def counts(self) -> tuple[int, int]:
        eff = self.effective()
        pos = sum(l.label for l in eff)
        return pos, len(eff) - pos


def _word(label: int) -> str:
    return "positive" if label else "negative"
