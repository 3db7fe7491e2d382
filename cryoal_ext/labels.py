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

    def __init__(self, path: str | os.PathLike | None = None, same_spot_px: float = 2.0):
        self.path = Path(path) if path else None
        self.same_spot_px = float(same_spot_px)
        self.labels: list[Label] = []
        if self.path is not None and self.path.exists():
            self.labels = self._read(self.path)

    @staticmethod
    def _read(path: Path) -> list[Label]:
        try:
            df = pd.read_csv(path, sep="\t", dtype={"micrograph": str, "source": str})
        except Exception as exc:
            raise LabelFileError(f"{path}: cannot read label file ({exc})") from exc
        missing = {"micrograph", "x", "y", "label"} - set(df.columns)
        if missing:
            raise LabelFileError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        bad = ~df["label"].isin([0, 1, RETRACTED])
        if bad.any():
            raise LabelFileError(f"{path}: label must be 0, 1 or {RETRACTED} (retracted) "
                                 f"(line {int(np.flatnonzero(bad)[0]) + 2})")
        out = []
        for r in df.itertuples(index=False):
            out.append(Label(str(r.micrograph), float(r.x), float(r.y), int(r.label),
                             str(getattr(r, "source", "user")), int(getattr(r, "round", 0)),
                             float(getattr(r, "time", 0.0))))
        return out

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
