"""The rules of a review, in one place, for every host (plain files, RELION, cryoSPARC, pipeliner).

What an edit of shown proposals means:
  kept proposal -> positive; deleted -> negative, unless a new positive lies within the particle
  radius (the user re-centred it); added pick -> positive; a pick the host marks (RELION's red
  selection type) -> as marked; a micrograph the user did not open -> nothing (hosts tell an
  opened file by its digest).

When a review counts: it answers the proposals of one round on one micrograph, and it counts
once.  The session keeps a ledger of the answers applied (``session.json`` ``reviews``), and each
label it adds carries a tag naming the round and the answer, so a run killed between writing the
labels and the ledger is recognised too.  The same answer again is a no-op; a different answer
to proposals already answered is refused; an answer that keeps none of its round's proposals and
is, pick for pick, an answer applied to an earlier round is refused as that earlier review again.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from scipy.spatial import cKDTree

from .acquisition import Proposal
from .labels import Label

TAG_SEP = "#"


class ReviewError(ValueError):
    """A review that must not be applied (already answered, stale, or of an unknown round)."""


@dataclass
class Edited:
    """A user's picks for one micrograph after review: coordinates and, where the host has one, a label."""

    x: np.ndarray
    y: np.ndarray
    label: np.ndarray | None = None  # 1 positive, 0 negative; None: all positive


def diff_edits(shown: list[Proposal], edited: dict[str, Edited], radius_px: float, round_: int,
               match_px: float | None = None, source: str = "review") -> list[Label]:
    """Labels from a review by the rules above; only micrographs present in ``edited`` count as reviewed."""
    match_px = match_px if match_px is not None else max(1.0, 0.2 * radius_px)
    out: list[Label] = []
    by_mic: dict[str, list[Proposal]] = {}
    for p in shown:
        by_mic.setdefault(p.micrograph, []).append(p)
    for name, ed in edited.items():
        ex, ey = np.asarray(ed.x, float), np.asarray(ed.y, float)
        elab = np.ones(ex.size, int) if ed.label is None else np.asarray(ed.label, int)
        used = np.zeros(ex.size, bool)
        tree = cKDTree(np.c_[ex, ey]) if ex.size else None
        deleted = []
        for p in by_mic.get(name, []):
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


def kept_count(shown: list[Proposal], ed: Edited, match_px: float) -> int:
    """How many of ``shown`` have a pick of ``ed`` within ``match_px``."""
    ex, ey = np.asarray(ed.x, float), np.asarray(ed.y, float)
    if not ex.size:
        return 0
    return sum(float(np.min(np.hypot(ex - p.x, ey - p.y))) <= match_px for p in shown)


# --- digests: what was shown, what was answered -------------------------------------------------
def _digest(rows: Iterable[str]) -> str:
    h = hashlib.sha1()
    for r in rows:
        h.update(r.encode())
        h.update(b"\n")
    return h.hexdigest()


def proposals_digest(props: Iterable[Proposal]) -> str:
    """Order-free digest of proposals as stored (3 decimals, as the proposals file keeps them)."""
    return _digest(sorted(f"{p.micrograph}\t{p.x:.3f}\t{p.y:.3f}" for p in props))


def shown_digests(props: Iterable[Proposal]) -> dict[str, str]:
    by_mic: dict[str, list[Proposal]] = {}
    for p in props:
        by_mic.setdefault(p.micrograph, []).append(p)
    return {m: proposals_digest(ps) for m, ps in sorted(by_mic.items())}


def answer_digest(ed: Edited) -> str:
    """Order-free digest of one micrograph's answer (coordinates to 0.01 px and labels)."""
    x, y = np.asarray(ed.x, float), np.asarray(ed.y, float)
    lab = np.ones(x.size, int) if ed.label is None else np.asarray(ed.label, int)
    return _digest(sorted(f"{a:.2f}\t{b:.2f}\t{int(c)}" for a, b, c in zip(x, y, lab)))


# --- applying answers -----------------------------------------------------------------------
@dataclass
class Answer:
    """One micrograph's answer to the proposals of round ``round`` (``independent``: plain picks)."""

    round: int
    micrograph: str
    edited: Edited
    source: str  # the file or dataset it came from, for messages
    independent: bool = False  # picks that answer no proposals: no implicit negatives
    label_source: str | None = None  # the labels' source column (default: apply_answers' ``source``)

    @property
    def digest(self) -> str:
        return answer_digest(self.edited)

    @property
    def key(self) -> str:
        return (f"picks/{self.micrograph}/{self.digest[:16]}" if self.independent
                else f"{self.round:03d}/{self.micrograph}")

    @property
    def tag(self) -> str:
        return f"{TAG_SEP}{'p' if self.independent else 'r'}{self.round:03d}.{self.digest[:10]}"

    @property
    def store_key(self) -> tuple[str, str]:
        """How its labels' tags are found again in the store (see _tags_in_store)."""
        return (self.micrograph, "p" if self.independent else f"r{self.round:03d}")


@dataclass
class Outcome:
    labels: list[Label] = field(default_factory=list)  # labels of the answers applied now
    added: int = 0  # rows appended to the label store
    applied: list[Answer] = field(default_factory=list)
    repeated: list[Answer] = field(default_factory=list)  # applied before: nothing done

    @property
    def positives(self) -> int:
        return sum(l.label for l in self.labels)


def _tags_in_store(labels: Iterable[Label]) -> dict[tuple[str, str], set[str]]:
    """(micrograph, 'r003' or 'p') -> answer digest prefixes, from the tags of labels already stored."""
    out: dict[tuple[str, str], set[str]] = {}
    for l in labels:
        _, sep, tag = l.source.rpartition(TAG_SEP)
        if sep and "." in tag:
            rnd, digest = tag.split(".", 1)
            out.setdefault((l.micrograph, "p" if rnd.startswith("p") else rnd), set()).add(digest)
    return out


def check_inside(answers: list[Answer], extra: Iterable[Label], shape_of: Callable[[str], tuple[int, int] | None]):
    """A label off its micrograph is a wrong file or scale, never an answer: refuse it, naming where it came from."""
    pts = [(a.source, a.micrograph, np.asarray(a.edited.x, float), np.asarray(a.edited.y, float)) for a in answers]
    pts += [(l.source, l.micrograph, np.array([l.x]), np.array([l.y])) for l in extra]
    for src, mic, x, y in pts:
        shape = shape_of(mic)
        if shape is None or not x.size:
            continue
        ny, nx = shape
        bad = np.flatnonzero(~((x >= 0) & (x <= nx) & (y >= 0) & (y <= ny)))
        if bad.size:
            i = int(bad[0])
            raise ReviewError(f"{src}: a pick at x={x[i]:g}, y={y[i]:g} lies outside micrograph {mic} ({nx} x {ny} px); "
                              f"{bad.size} such pick(s). Are these coordinates for a binned or another micrograph?")


def apply_answers(session, answers: list[Answer], radius_of: Callable[[str], float], source: str,
                  match_px: Callable[[str], float] | None = None, extra: list[Label] = (),
                  shape_of: Callable[[str], tuple[int, int] | None] | None = None) -> Outcome:
    """Turn answers into labels by the rules above and store them, each answer once.

    ``extra``: labels that answer no proposals (particles, label files), stored in the same write.
    ``shape_of``: micrograph -> (ny, nx), to refuse picks off the micrograph.
    Raises :class:`ReviewError` (and stores nothing) if any answer is refused.
    """
    if shape_of is not None:
        check_inside(answers, extra, shape_of)
    ledger: dict = session.state.setdefault("reviews", {})
    stored = _tags_in_store(session.labels.labels)
    match_of = match_px or (lambda m: max(1.0, 0.2 * radius_of(m)))
    earlier = _answers_applied(ledger, stored)
    out = Outcome()
    shown_cache: dict[int, list[Proposal]] = {}
    seen: dict[str, str] = {}
    for a in answers:
        d = a.digest
        if seen.setdefault(a.key, d) != d:
            raise ReviewError(f"{a.source}: two different answers to the proposals of round {a.round} on "
                              f"{a.micrograph} in one run; give one")
        prev = ledger.get(a.key)
        in_store = stored.get(a.store_key, set())
        if prev is None and in_store:  # labels written but not the ledger (a killed run), or ledger lost
            if d[:10] in in_store:
                prev = ledger[a.key] = {"answer": d, "source": a.source, "round_applied": session.round,
                                        "recovered": True}
            elif not a.independent:
                prev = {"answer": "?", "source": "labels.tsv"}
        if prev is not None:
            if prev.get("answer") == d:
                out.repeated.append(a)
                continue
            raise ReviewError(
                f"{a.source}: the proposals of round {a.round} on {a.micrograph} were already answered "
                f"(by {prev.get('source')}, in round {prev.get('round_applied', '?')}); a second, different "
                "answer to the same proposals is refused. Give further picks as extra positives/negatives, "
                "or review the latest round's queries")
        tagged = (a.label_source or source) + a.tag
        if a.independent:
            labs = diff_edits([], {a.micrograph: a.edited}, radius_of(a.micrograph), session.round, source=tagged)
        else:
            if a.round not in shown_cache:
                shown_cache[a.round] = session.shown(a.round)
            shown = [p for p in shown_cache[a.round] if p.micrograph == a.micrograph]
            before = earlier.get((a.micrograph, d[:10]))
            if shown and a.edited.x.size and before is not None and kept_count(shown, a.edited, match_of(a.micrograph)) == 0:
                raise ReviewError(
                    f"{a.source}: on {a.micrograph} it keeps none of the {len(shown)} proposals of round {a.round} "
                    f"and is, pick for pick, the answer already applied to the proposals of round {before}: it is "
                    f"that earlier review again. Review round {a.round}'s queries instead")
            labs = diff_edits(shown, {a.micrograph: a.edited}, radius_of(a.micrograph), session.round, source=tagged)
        out.labels += labs
        out.applied.append(a)
    out.added = session.labels.add(out.labels + list(extra))  # saved first: a kill now is recognised by the tags
    for a in out.applied:
        ledger[a.key] = {"answer": a.digest, "source": a.source, "round_applied": session.round,
                         "labels": sum(1 for l in out.labels if l.micrograph == a.micrograph and l.source.endswith(a.tag))}
    if out.applied or out.repeated:
        session.save_state()
    return out


def _answers_applied(ledger: dict, stored: dict[tuple[str, str], set[str]]) -> dict[tuple[str, str], int]:
    """(micrograph, answer digest prefix) -> the round it answered, for every review applied so far."""
    out = {}
    for key, v in ledger.items():
        rnd, _, mic = key.partition("/")
        if rnd.isdigit():
            out[(mic, str(v.get("answer", ""))[:10])] = int(rnd)
    for (mic, rtag), digests in stored.items():
        if rtag.startswith("r") and rtag[1:].isdigit():
            out.update({(mic, d): int(rtag[1:]) for d in digests})
    return out
