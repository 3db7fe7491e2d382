"""The append-only label file and the session folder (proposals per round, review diffs)."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from cryoal_ext.acquisition import Proposal
from cryoal_ext.labels import Label, LabelFileError, LabelStore
from cryoal_ext.session import STATE_FORMAT, Edited, Session, diff_edits


def _lines(path):
    return path.read_text().splitlines()


# --- LabelStore ------------------------------------------------------------------------------------
def test_label_file_only_grows_and_reopens(tmp_path):
    path = tmp_path / "labels.tsv"
    store = LabelStore(path)
    assert len(store) == 0 and not path.exists()
    assert store.add([Label("m1", 10.0, 20.0, 1), Label("m1", 200.0, 20.0, 0), Label("m2", 10.0, 20.0, 1)]) == 3
    first = _lines(path)
    assert first[0].split("\t") == ["micrograph", "x", "y", "label", "source", "round", "time"]
    assert len(first) == 4
    # a label given anew for a spot with the same answer is not appended
    assert store.add([Label("m1", 10.0, 20.0, 1)]) == 0
    assert _lines(path) == first
    # the opposite answer is appended: the old line stays, in place
    assert store.add([Label("m1", 10.5, 20.0, 0, round=1)]) == 1
    second = _lines(path)
    assert len(second) == 5 and second[:4] == first
    # reopening resumes with every label, in order, timestamps included
    again = LabelStore(path)
    assert len(again) == 4
    assert [(l.micrograph, l.x, l.y, l.label, l.round) for l in again.labels] == [
        ("m1", 10.0, 20.0, 1, 0), ("m1", 200.0, 20.0, 0, 0), ("m2", 10.0, 20.0, 1, 0), ("m1", 10.5, 20.0, 0, 1)]
    assert all(l.time > 0 for l in again.labels)
    assert again.counts() == (1, 2)  # m1 spot now negative; m1 far spot negative; m2 positive
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tsv"]  # no temporary files left


def test_conflict_newest_wins_and_is_logged(tmp_path, caplog):
    store = LabelStore(tmp_path / "labels.tsv", same_spot_px=2.0)
    store.add([Label("m", 100.0, 100.0, 1, time=1.0), Label("m", 300.0, 300.0, 1, time=1.0)])
    store.add([Label("m", 101.0, 101.0, 0, time=2.0)])  # 1.4 px away: the same spot
    with caplog.at_level(logging.WARNING, logger="cryoal_ext.labels"):
        eff = store.effective()
    assert sorted((l.x, l.y, l.label) for l in eff) == [(101.0, 101.0, 0), (300.0, 300.0, 1)]
    assert any("conflicting" in r.getMessage() and "newest wins" in r.getMessage() for r in caplog.records)
    # and back again: the newest is positive
    store.add([Label("m", 100.0, 100.0, 1, time=3.0)])
    assert sorted((l.x, l.y, l.label) for l in store.effective()) == [(100.0, 100.0, 1), (300.0, 300.0, 1)]
    assert len(store) == 4  # nothing removed from the file


def test_same_spot_same_answer_and_other_micrographs_no_conflict(tmp_path, caplog):
    store = LabelStore(tmp_path / "labels.tsv")
    store.add([Label("a", 50.0, 50.0, 1), Label("a", 51.0, 50.0, 1),  # same spot, same answer
               Label("b", 50.0, 50.0, 0),  # same coordinates on another micrograph
               Label("a", 55.0, 50.0, 0)])  # 4 px from the newest at that spot: another spot
    with caplog.at_level(logging.WARNING, logger="cryoal_ext.labels"):
        eff = store.effective()
    assert not [r for r in caplog.records if "conflicting" in r.getMessage()]
    assert sorted((l.micrograph, l.x, l.label) for l in eff) == [("a", 51.0, 1), ("a", 55.0, 0), ("b", 50.0, 0)]


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "labels.tsv"
    store = LabelStore(path)
    store.add([Label("m", 1.0, 2.0, 1)])
    before = path.read_bytes()

    def crash(self, target, *a, **k):  # a crash half-way through writing the new file
        with open(target, "w") as f:
            f.write("micrograph\tx\n garbage")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(OSError):
        store.add([Label("m", 50.0, 50.0, 0)])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tsv"]
    assert len(LabelStore(path)) == 1


def test_in_memory_store_and_bad_files(tmp_path):
    mem = LabelStore(None)
    assert mem.add([Label("m", 1.0, 1.0, 1)]) == 1 and len(mem) == 1
    bad = tmp_path / "bad_labels.tsv"
    bad.write_text("micrograph\tx\ty\nm\t1\t2\n")
    with pytest.raises(LabelFileError, match="bad_labels.tsv.*label"):
        LabelStore(bad)
    bad.write_text("micrograph\tx\ty\tlabel\nm\t1\t2\t1\nm\t3\t4\t2\n")
    with pytest.raises(LabelFileError, match=r"bad_labels.tsv.*line 3"):
        LabelStore(bad)
    # a hand-written file with only the four required columns is fine
    ok = tmp_path / "hand.tsv"
    ok.write_text("micrograph\tx\ty\tlabel\n007\t1.5\t2.5\t1\n")
    labels = LabelStore(ok).labels
    assert labels[0].micrograph == "007" and labels[0].x == 1.5 and labels[0].source == "user"


# --- Session ---------------------------------------------------------------------------------------
def test_session_state_and_proposals_resume(tmp_path):
    s = Session(tmp_path / "sess")
    assert s.round == 0 and s.state["format"] == STATE_FORMAT
    props = [Proposal("0001", 10.25, 20.5, 0.42, "uncertain"), Proposal("0002", 300.0, 400.0, 0.99, "positive")]
    path = s.save_proposals(0, props)
    assert path == tmp_path / "sess" / "proposals" / "round_000.tsv"
    s.labels.add([Label("0001", 10.0, 20.0, 1)])
    s.record(round=0, labels=1)
    s.save_state(round=1)

    again = Session(tmp_path / "sess")
    assert again.round == 1 and again.state["history"] == [{"round": 0, "labels": 1}]
    loaded = again.load_proposals(0)
    assert [(p.micrograph, p.x, p.y, p.kind) for p in loaded] == [("0001", 10.25, 20.5, "uncertain"),
                                                                   ("0002", 300.0, 400.0, "positive")]
    assert [p.score for p in loaded] == pytest.approx([0.42, 0.99], abs=1e-3)
    assert again.load_proposals(1) == []
    assert len(again.labels) == 1
    assert again.model_path == tmp_path / "sess" / "model.npz"
    # rewriting a round's proposals replaces them
    again.save_proposals(0, props[:1])
    assert len(Session(tmp_path / "sess").load_proposals(0)) == 1


def _shown():
    return [Proposal("a", 100.0, 100.0, 0.5, "uncertain"), Proposal("a", 300.0, 300.0, 0.5, "uncertain"),
            Proposal("a", 500.0, 500.0, 0.5, "uncertain"), Proposal("b", 100.0, 100.0, 0.5, "uncertain")]


def test_diff_edits_keep_delete_recentre_add():
    edited = {"a": Edited(np.array([101.0, 510.0, 700.0]), np.array([100.0, 500.0, 700.0]))}
    labels = diff_edits(_shown(), edited, radius_px=28.0, round_=3)
    got = sorted((l.micrograph, l.x, l.y, l.label) for l in labels)
    assert got == [
        ("a", 100.0, 100.0, 1),  # kept (moved 1 px, within the match distance 0.2 R = 5.6 px): positive at the proposal
        ("a", 300.0, 300.0, 0),  # deleted: negative
        ("a", 510.0, 500.0, 1),  # re-centred: the new pick is the positive, the proposal is no negative
        ("a", 700.0, 700.0, 1),  # added: positive
    ]  # micrograph b was not reviewed: nothing from it
    assert all(l.round == 3 and l.source == "review" for l in labels)


def test_diff_edits_far_move_is_delete_plus_add_and_explicit_labels_win():
    # moved 40 px (beyond R = 28): the proposal is a negative and the new pick a positive
    labels = diff_edits(_shown()[:1], {"a": Edited(np.array([140.0]), np.array([100.0]))}, 28.0, 0)
    assert sorted((l.x, l.label) for l in labels) == [(100.0, 0), (140.0, 1)]
    # explicit labels: the kept proposal marked negative; an added negative near a deleted proposal
    ed = Edited(np.array([100.0, 305.0, 520.0]), np.array([100.0, 300.0, 500.0]), label=np.array([0, 1, 0]))
    labels = diff_edits(_shown()[:3], {"a": ed}, 28.0, 0, match_px=3.0)
    got = sorted((l.x, l.y, l.label) for l in labels)
    # 305 is 5 px from 300: beyond match_px=3 -> proposal 300 deleted, but re-centred by the positive at 305
    # 520 (negative) does not re-centre proposal 500, which becomes a negative too
    assert got == [(100.0, 100.0, 0), (305.0, 300.0, 1), (500.0, 500.0, 0), (520.0, 500.0, 0)]


def test_diff_edits_all_deleted_and_one_pick_per_proposal():
    # a reviewed micrograph with every pick removed: all its proposals are negatives
    labels = diff_edits(_shown(), {"b": Edited(np.empty(0), np.empty(0))}, 28.0, 0)
    assert [(l.micrograph, l.x, l.label) for l in labels] == [("b", 100.0, 0)]
    # two proposals near one kept pick: only one of them is matched to it
    shown = [Proposal("a", 100.0, 100.0, 0.5, "uncertain"), Proposal("a", 103.0, 100.0, 0.5, "uncertain")]
    labels = diff_edits(shown, {"a": Edited(np.array([102.0]), np.array([100.0]))}, 28.0, 0, match_px=5.0)
    assert sorted((l.x, l.label) for l in labels) == [(100.0, 1), (103.0, 0)]
