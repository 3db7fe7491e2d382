"""A labelling session kept in a folder: labels, model, rounds, proposals shown, reviews applied.

RELION and cryoSPARC edit picks in place or hand back a new set, never a list of answers, so
every round keeps its own copy of the proposals it showed (with a digest in session.json); the
next round diffs the user's edited picks against that copy (cryoal_ext/review.py owns the rules).
Everything here is plain TSV/JSON and written atomically; a crashed or repeated run resumes from
the folder, and a folder whose parts disagree is refused with a way out.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from .acquisition import Proposal
from .atomic import atomic_path, write_json
from .labels import LabelStore
from .review import Edited, diff_edits, shown_digests  # noqa: F401  (Edited, diff_edits: re-exported)

__all__ = ["Edited", "ProposalFiles", "Session", "SessionError", "STATE_FORMAT", "diff_edits"]

STATE_FORMAT = "cryoal_ext.session/1"
_ROUND_FILE = re.compile(r"round_(\d{3,})\.tsv$")


class SessionError(ValueError):
    """The session folder is inconsistent; the message names what and how to recover."""


class ProposalFiles:
    """The proposals each round showed, one TSV per round under ``proposals/``: files only, no state.

    Kept apart from Session so that a folder whose session.json is lost can still be read (``cryoal
    session --repair``) without the checks that refuse it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, round_: int) -> Path:
        return self.folder / "proposals" / f"round_{round_:03d}.tsv"

    def rounds(self) -> list[int]:
        d = self.folder / "proposals"
        return sorted(int(m.group(1)) for f in d.glob("round_*.tsv") if (m := _ROUND_FILE.search(f.name))) \
            if d.is_dir() else []

    def save(self, round_: int, proposals: list[Proposal]) -> Path:
        path = self.path(round_)
        df = pd.DataFrame([p.__dict__ for p in proposals], columns=["micrograph", "x", "y", "score", "kind"])
        with atomic_path(path) as tmp:
            df.to_csv(tmp, sep="\t", index=False, float_format="%.3f")
        return path

    def load(self, round_: int) -> list[Proposal]:
        path = self.path(round_)
        if not path.exists():
            return []
        try:
            df = pd.read_csv(path, sep="\t", dtype={"micrograph": str, "kind": str}, keep_default_na=False)
            return [Proposal(str(r.micrograph), float(r.x), float(r.y), float(r.score), str(r.kind))
                    for r in df.itertuples(index=False)]
        except (ValueError, AttributeError, pd.errors.ParserError) as exc:
            raise SessionError(f"{path}: cannot read the proposals of round {round_} ({exc})") from None


class Session:
    """The folder of one labelling session (a RELION job folder, a cryoSPARC job's work folder, ...)."""

    def __init__(self, folder: str | os.PathLike, check: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proposal_files = ProposalFiles(self.folder)
        self.state_path = self.folder / "session.json"
        self.state = self._read_state()
        self.labels = LabelStore(self.folder / "labels.tsv", on_save=self._labels_saved)
        if check:
            self.check()

    # -- state ------------------------------------------------------------------------------
    def _read_state(self) -> dict:
        if not self.state_path.exists():
            return {"format": STATE_FORMAT, "round": 0, "history": []}
        try:
            state = json.loads(self.state_path.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("round", 0), int):
                raise ValueError("not a session state (no integer 'round')")
        except (OSError, ValueError) as exc:
            raise SessionError(f"{self.state_path}: cannot read the session state ({exc}). Restore it from a "
                               f"backup, or rebuild it from the folder with: cryoal session {self.folder} --repair"
                               ) from None
        return state

    def check(self) -> None:
        """Refuse a folder whose parts disagree: going on could re-apply a review or overwrite a round."""
        rounds = self.proposal_rounds()
        n_rows = len(self.labels)
        where = f"{self.folder}"
        if not self.state_path.exists():
            held = []
            if n_rows:
                held.append(f"labels.tsv holds {n_rows} label rows")
            if rounds:
                held.append(f"proposals/ holds round(s) {rounds[0]}-{rounds[-1]}")
            if held:
                raise SessionError(
                    f"{where}: session.json is missing, but {' and '.join(held)}: the session's round and the "
                    "reviews already applied are unknown, so going on could re-apply a review or overwrite a "
                    f"round. Restore session.json from a backup, rebuild it with: cryoal session {self.folder} "
                    "--repair, or start a new session in a new folder")
            return
        recorded = int(self.state.get("label_rows", 0))
        if n_rows < recorded:
            what = "is missing" if not self.labels.path.exists() else f"holds {n_rows} label rows"
            raise SessionError(
                f"{where}: labels.tsv {what}, but session.json records {recorded} label rows: labels would be "
                "lost. Restore labels.tsv from a backup (it is only ever appended to), or start a new session in "
                "a new folder")
        late = [r for r in rounds if r > self.round]
        if late:
            raise SessionError(
                f"{where}: session.json is at round {self.round}, but proposals/ holds round {late[-1]}: the "
                f"state is older than the folder. Restore the newer session.json, or rebuild it with: "
                f"cryoal session {self.folder} --repair")

    def _labels_saved(self, store: LabelStore) -> None:
        if len(store) > int(self.state.get("label_rows", 0)):
            self.save_state(label_rows=len(store))

    @property
    def round(self) -> int:
        return int(self.state["round"])

    @property
    def model_path(self) -> Path:
        return self.folder / "model.npz"

    def save_state(self, **updates) -> None:
        self.state.update(updates)
        write_json(self.state_path, self.state)

    def record(self, **event) -> None:
        self.state.setdefault("history", []).append(event)
        self.save_state()

    # -- proposals shown ----------------------------------------------------------------------
    def proposals_path(self, round_: int) -> Path:
        return self.proposal_files.path(round_)

    def proposal_rounds(self) -> list[int]:
        return self.proposal_files.rounds()

    def save_proposals(self, round_: int, proposals: list[Proposal]) -> Path:
        path = self.proposal_files.save(round_, proposals)
        self.state.setdefault("shown", {})[str(round_)] = shown_digests(self.load_proposals(round_))
        self.save_state()
        return path

    def load_proposals(self, round_: int) -> list[Proposal]:
        return self.proposal_files.load(round_)

    def shown(self, round_: int) -> list[Proposal]:
        """The proposals of ``round_`` as they were shown; refused if the file changed or vanished since."""
        props = self.load_proposals(round_)
        recorded = self.state.get("shown", {}).get(str(round_))
        if recorded is None:
            if not self.proposals_path(round_).exists():
                raise SessionError(f"{self.folder}: no proposals were saved for round {round_} "
                                   f"({self.proposals_path(round_)} does not exist)")
            return props
        now = shown_digests(props)
        changed = sorted(m for m in set(now) | set(recorded) if now.get(m) != recorded.get(m))
        if changed:
            raise SessionError(
                f"{self.proposals_path(round_)}: the proposals of round {round_} on {len(changed)} micrograph(s) "
                f"(e.g. {changed[0]}) differ from what was shown: a review cannot be tied to them. Restore the "
                "file, or start a new session in a new folder")
        return props

    # -- settings that shape a round ------------------------------------------------------------
    def note_settings(self, settings: dict) -> list[str]:
        """Record the settings of this round; a change from the last round is recorded and returned (to warn)."""
        prev = self.state.get("settings")
        changes = {k: [prev.get(k), v] for k, v in settings.items() if prev is not None and prev.get(k) != v}
        if prev is None or changes:
            if changes:
                self.state.setdefault("settings_changes", []).append({"round": self.round, "changed": changes})
            self.save_state(settings=dict(settings))
        return [f"{k} changed from {old!r} to {new!r} in round {self.round} (recorded in {self.state_path})"
                for k, (old, new) in changes.items()]
