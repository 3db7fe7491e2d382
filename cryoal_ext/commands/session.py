"""Check a session folder, or rebuild its session.json from the files beside it (the way out of a refusal)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import folder_lock, write_json
from ..io import file_digest
from ..labels import LabelStore
from ..review import shown_digests
from ..session import STATE_FORMAT, ProposalFiles, Session, SessionError


def add_arguments(p) -> None:
    p.add_argument("folder", help="session folder (cryoal round --session, a RELION job folder, a cryoSPARC session)")
    p.add_argument("--repair", action="store_true",
                   help="rebuild a missing or unreadable session.json from proposals/, labels.tsv and the "
                        "RELION round copies (labels are never changed)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def rebuild_state(folder: Path) -> dict:
    """A session state consistent with the folder: every round that has proposals counts as shown.

    Reviews already applied are recognised from the tags of the labels themselves (review.py), so
    none can be applied twice; for a RELION job the files we wrote are recognised from our own
    copies under rounds/, so unopened files stay unopened.
    """
    files = ProposalFiles(folder)  # files only: the state is what is being rebuilt
    rounds = files.rounds()
    labels = LabelStore(folder / "labels.tsv")
    state = {"format": STATE_FORMAT, "round": rounds[-1] + 1 if rounds else 0, "history": [],
             "label_rows": len(labels), "reviews": {}, "repaired": True,
             "shown": {str(r): shown_digests(files.load(r)) for r in rounds}}
    copies = sorted(folder.glob("rounds/round_*/queries"))
    if copies:  # a RELION job: the per-micrograph queries files we wrote, newest round last
        project = folder.parent.parent
        written: dict[str, dict] = {}
        for qdir in copies:
            rnd = int(qdir.parent.name.split("_")[1])
            for f in sorted(qdir.rglob("*_queries.star")):
                job_file = folder / f.relative_to(qdir)
                written[os.path.relpath(job_file, project)] = {"digest": file_digest(f), "round": rnd}
        state["relion"] = {"written_queries": written}
    return state


def main(args) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such session folder")
    if args.repair:
        with folder_lock(folder):
            try:
                Session(folder)
                print(f"{folder}: consistent; nothing to repair")
                return 0
            except SessionError as exc:
                if not (folder / "labels.tsv").exists() and (folder / "session.json").exists():
                    raise ValueError(f"{exc}\n(--repair cannot bring back labels)") from None
                print(f"repairing: {exc}")
            old = folder / "session.json"
            if old.exists():
                os.replace(old, folder / "session.json.bad")
                print(f"the old state is kept as {folder / 'session.json.bad'}")
            state = rebuild_state(folder)
            write_json(old, state)
            Session(folder)  # consistent now
            print(f"{old}: rebuilt at round {state['round']} with {state['label_rows']} label rows; reviews already "
                  "applied are recognised from the labels' tags")
            return 0
    s = Session(folder) if (folder / "session.json").exists() or any(folder.iterdir()) else None
    if s is None:
        raise ValueError(f"{folder}: empty folder, not a session")
    pos, neg = s.labels.counts()
    print(json.dumps({"folder": str(folder), "round": s.round, "labels": {"positive": pos, "negative": neg,
                      "rows": len(s.labels)}, "proposal_rounds": s.proposal_rounds(),
                      "reviews_applied": len(s.state.get("reviews", {})), "consistent": True}, indent=2))
    return 0
