"""Audits (issue 16, item 3): proposals that ask about the picks themselves, and the calibration refined on them.

Synthetic checks of the fit and the matching, then the learner on the bundled example crops (resnet16_u32).
"""
from __future__ import annotations

import numpy as np
import pytest

from cryoal_ext.acquisition import Proposal
from cryoal_ext.calibration import CalibrationSettings, audit_answers, calibrate, platt
from cryoal_ext.labels import Label
from cryoal_ext.recipes import get_recipe


def test_recipe_audit_settings_are_checked():
    assert get_recipe("default", audits=4).audits == 4
    for bad in ({"audits": -1}, {"audit_after": -5}, {"audits_on": "elsewhere"}):
        with pytest.raises(ValueError, match="audit"):
            get_recipe("default", **bad)
    assert get_recipe("audited").audits_apart and not get_recipe("default").audits_apart
    assert not get_recipe("default", audits=3, audits_on="training").audits_apart  # no micrograph kept apart


def test_platt_around_a_centre_moves_only_as_far_as_the_audits_say():
    rng = np.random.default_rng(0)
    centre = (0.8, 0.2)
    # picks at logit ~5 that are right only half the time: the map must bring them down towards 0.5
    z = rng.normal(5.0, 1.0, 400)
    y = rng.random(z.size) < 0.5
    cal = platt(z, y, centre=centre, min_n=5)
    p = cal.prob(5.0)
    assert 0.4 < p < 0.65 and cal.n == 400
    # all-positive audits are evidence too (around a centre other than the identity): nothing falls
    ones = platt(z[:20], np.ones(20), centre=centre, min_n=5)
    assert ones.prob(5.0) >= 1 / (1 + np.exp(-(0.8 * 5 + 0.2))) - 1e-9
    # under min_n: the centre itself
    few = platt(z[:4], y[:4], centre=centre, min_n=5)
    assert (few.a, few.b) == centre


def test_each_audit_takes_the_nearest_answer_on_an_audit_micrograph_within_a_radius_once():
    class L:  # the learner's attributes audit_answers reads
        audit_items = {"a1": None, "a2": None}
        items = {"t1": None}
        recipe = get_recipe("audited")
        radius_px = 10.0

    labels = [Label("a1", 100, 100, 1), Label("a1", 104, 100, 0), Label("a2", 50, 50, 1), Label("a1", 300, 300, 0),
              Label("t1", 103, 100, 1), Label("a1", 102, 100, 1, "pseudo")]
    audits = [Proposal("a1", 103, 100, 0.9, "audit"), Proposal("a1", 101, 100, 0.9, "audit"),
              Proposal("a2", 80, 50, 0.9, "audit"), Proposal("a1", 300, 300, 0.9, "uncertain"),
              Proposal("t1", 103, 100, 0.9, "audit")]
    pairs = audit_answers(L(), labels, audits)
    # the first audit takes its nearest answer (104, 100), the second the next; a2's is too far; an uncertain
    # proposal, a training micrograph's answer and a pseudo-label are no audit answers
    assert [(l.x, a.x) for l, a in pairs] == [(104, 103), (100, 101)]


@pytest.fixture(scope="module")
def learner_run(example_data, feature_cache):
    from cryoal_ext.features import FeatureCache
    from cryoal_ext.files import by_micrograph, read_coordinates
    from cryoal_ext.io import load_micrograph
    from cryoal_ext.learner import ActiveLearner, Item
    from cryoal_ext.oracle import Oracle

    cache = FeatureCache(feature_cache, "resnet16_u32", "cpu")
    mics = [load_micrograph(example_data / "micrographs" / f"{n}.mrc") for n in
            ("061_10028_crop", "311_10028_crop", "312_10028_crop")]
    items = [Item(m, cache.get(m)) for m in mics]
    recipe = get_recipe("default", audits=3, audit_after=16, audits_on="apart")
    learner = ActiveLearner(items[:2], 28.0, recipe, "resnet16_u32", seed=3, audit_items=items[2:])
    oracle = Oracle(by_micrograph(read_coordinates(example_data / "particles.txt")), 28.0, "careful")
    labels, asked = [], []
    learner.fit(labels)
    for rnd in range(5):
        props = learner.initial_proposals(8, labels) if rnd == 0 else learner.propose(8, labels)
        asked.append(props)
        labels += oracle.answer(props, rnd)
        learner.fit(labels)
    return learner, items, recipe, labels, asked


def test_audits_come_on_top_after_enough_answers_and_ask_about_picks_of_the_audit_micrograph(learner_run):
    from cryoal_ext.extract import extract_picks
    from cryoal_ext.learner import ActiveLearner

    learner, items, recipe, labels, asked = learner_run
    kinds = [[p.kind for p in props] for props in asked]
    assert all("audit" not in k for k in kinds[:2])  # 0 and 8 training answers before them; round 2 has 16
    assert all(k.count("audit") == 3 and len(k) == 11 for k in kinds[2:])  # the batch of 8, and 3 on top
    audit_mic = items[2].mic.name
    assert {p.micrograph for props in asked for p in props if p.kind == "audit"} == {audit_mic}
    assert all(p.micrograph != audit_mic for props in asked for p in props if p.kind != "audit")
    # the model never trains on the audit micrograph's answers
    trained_on = [l for l in labels if l.micrograph in learner.items]
    refit = ActiveLearner(items[:2], 28.0, recipe.with_(audits=0), "resnet16_u32", seed=3)
    assert np.allclose(refit.fit(trained_on).coef_, learner.model.coef_, atol=1e-6)
    # an audit is a pick of the current model there (an NMS maximum), never within a radius of a labelled spot
    props = learner.audits(5, labels, draw=len(labels))
    assert len(props) == 5 and {p.kind for p in props} == {"audit"}
    it = items[2]
    pk = extract_picks(audit_mic, learner.model.logit_map(it.fmap.features), it.mic.frame, 28.0)
    for p in props:
        assert np.min(np.hypot(pk.x - p.x, pk.y - p.y)) < 1e-6
        assert all(np.hypot(l.x - p.x, l.y - p.y) > 28.0 for l in labels if l.micrograph == audit_mic)
    # the same draw again asks the same; another draw (a later round) asks anew
    again = ActiveLearner(items[:2], 28.0, recipe, "resnet16_u32", seed=3, audit_items=items[2:])
    again.model = learner.model
    assert [(p.x, p.y) for p in again.audits(5, labels, draw=len(labels))] == [(p.x, p.y) for p in props]
    assert [(p.x, p.y) for p in learner.audits(5, labels, draw=len(labels) + 1)] != [(p.x, p.y) for p in props]
    with pytest.raises(ValueError, match="both trained on and audited"):
        ActiveLearner(items[:2], 28.0, recipe, "resnet16_u32", audit_items=items[1:])


def test_calibration_is_refined_on_answered_audits_only_past_the_answer_gate(learner_run):
    learner, _, _, labels, asked = learner_run
    audits = [p for props in asked for p in props if p.kind == "audit"]
    s = CalibrationSettings(min_answers=12, min_audits=3)
    plain, refined = calibrate(learner, labels, s), calibrate(learner, labels, s, audits=audits)
    assert plain.audits == 0 and plain.n == 40  # the answers on the training micrographs only
    assert refined.audits == len(audit_answers(learner, labels, audits)) >= 3
    assert (refined.a, refined.b) != (plain.a, plain.b) and refined.a > 0
    assert calibrate(learner, labels, CalibrationSettings(min_answers=12, min_audits=50), audits=audits) == plain
    gated = calibrate(learner, labels, audits=audits)  # 40 answers, under the default's 60: raw probabilities
    assert (gated.a, gated.b, gated.audits) == (1.0, 0.0, 0)


def test_cli_round_with_audits_keeps_one_micrograph_apart_and_asks_about_its_picks(tmp_path, feature_cache, capsys):
    import json

    from conftest import blob_image, write_mrc
    from cryoal_ext.cli import main
    from cryoal_ext.files import read_coordinates
    from cryoal_ext.session import Session

    centres = [(60, 60), (190, 70), (70, 190), (180, 180), (128, 128)]
    for i, name in enumerate(["mic_a", "mic_b", "mic_c"]):
        write_mrc(tmp_path / f"{name}.mrc", blob_image((256, 256), centres, sigma=4.0, amplitude=5.0, noise=0.5,
                                                        seed=i).astype(np.float32), voxel_size=4.0)
    grid = [(x, y) for x in range(16, 250, 20) for y in range(16, 250, 20)
            if min(np.hypot(x - cx, y - cy) for cx, cy in centres) > 30][:55]
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("image_name\tx_coord\ty_coord\n" + "".join(f"mic_a\t{x}\t{y}\n" for x, y in centres))
    neg.write_text("image_name\tx_coord\ty_coord\n" + "".join(f"mic_a\t{x}\t{y}\n" for x, y in grid))
    fast = ["--feature-model", "resnet16_u32", "--device", "cpu", "--threads", "1", "--cache-dir", feature_cache]
    mics = sorted(str(p) for p in tmp_path.glob("*.mrc"))
    s = tmp_path / "S"
    # too few micrographs for audits: refused before anything is written
    rc = main(["round", *mics[:1], "--session", str(s), "--radius-px", "12", "--recipe", "audited",
               "--train-micrographs", "1", *fast])
    assert rc == 1 and "never trained on" in capsys.readouterr().err and not s.exists()
    rc = main(["round", *mics, "--session", str(s), "--radius-px", "12", "--recipe", "audited", "--batch", "4",
               "--train-micrographs", "1", "--positives", str(pos), "--negatives", str(neg), *fast])
    assert rc == 0
    session = Session(s)
    audited = session.state["audit_micrographs"]
    train = session.state["history"][-1]["train"]
    assert 1 <= len(audited) <= 2 and not set(audited) & set(train) and "mic_a" in train
    assert sorted(set(audited) | set(train)) == ["mic_a", "mic_b", "mic_c"]  # up to 2 audited, of those left
    props = session.load_proposals(0)
    audits = [p for p in props if p.kind == "audit"]
    assert len(audits) == 6 and {p.micrograph for p in audits} <= set(audited)  # 60 answers in: 6 audits on top
    assert sum(p.kind != "audit" for p in props) == 4
    queries = read_coordinates(s / "round_000" / "queries.txt")
    assert queries.image_name.isin(audited).sum() == 6  # shown for review with the rest
    # the review (every query kept) is read back; the audit answers calibrate and never train
    rc = main(["round", *mics, "--session", str(s), "--radius-px", "12", "--recipe", "audited", "--batch", "4",
               "--train-micrographs", "1", "--reviewed", str(s / "round_000" / "queries.txt"), *fast])
    assert rc == 0
    session = Session(s)
    on_audit = [l for l in session.labels.effective() if l.micrograph in audited]
    assert len(on_audit) == 6 and session.state["audit_micrographs"] == audited
    assert not set(audited) & set(session.state["history"][-1]["train"])
    from cryoal_ext.calibration import of
    from cryoal_ext.model import BLR

    assert of(BLR.load(session.model_path)).audits == 6
    # the other front ends refuse the recipe up front, naming it
    from cryoal_ext.recipes import offered_in

    with pytest.raises(ValueError, match="not yet in the RELION job"):
        offered_in("audited", "the RELION job")
    assert offered_in("default", "the RELION job") == "default"
    json.dumps(session.state)  # plain data


def test_cli_round_with_audits_whose_labels_cover_every_micrograph_stores_nothing(tmp_path, feature_cache, capsys):
    """Labels on every micrograph leave none for the audits: refused before a label is stored.  Labels on all
    but one: the training draw leaves that one for the audits (it used to take it and fail after storing)."""
    from conftest import blob_image, write_mrc
    from cryoal_ext.cli import main
    from cryoal_ext.session import Session

    centres = [(60, 60), (190, 70), (70, 190), (180, 180)]
    names = ["mic_a", "mic_b", "mic_c"]
    for i, name in enumerate(names):
        write_mrc(tmp_path / f"{name}.mrc", blob_image((128, 128), [(x // 2, y // 2) for x, y in centres], sigma=3.0,
                                                        amplitude=5.0, noise=0.5, seed=i).astype(np.float32),
                  voxel_size=4.0)
    every, two = tmp_path / "every.txt", tmp_path / "two.txt"
    every.write_text("image_name\tx_coord\ty_coord\n" + "".join(f"{n}\t30\t30\n" for n in names))
    two.write_text("image_name\tx_coord\ty_coord\n" + "".join(f"{n}\t30\t30\n" for n in names[:2]))
    mics = sorted(str(p) for p in tmp_path.glob("*.mrc"))
    fast = ["--feature-model", "resnet16_u32", "--device", "cpu", "--threads", "1", "--cache-dir", feature_cache]
    s = tmp_path / "S"
    for seed in ("0", "1", "2"):
        rc = main(["round", *mics, "--session", str(s), "--radius-px", "8", "--recipe", "audited", "--seed", seed,
                   "--positives", str(every), *fast])
        err = capsys.readouterr().err
        assert rc == 1 and "cover every one of the 3" in err and "nothing was stored" in err and not s.exists()
    for seed in ("0", "1", "2"):  # whatever the draw, mic_c is left for the audits
        s = tmp_path / f"S{seed}"
        rc = main(["round", *mics, "--session", str(s), "--radius-px", "8", "--recipe", "audited", "--seed", seed,
                   "--positives", str(two), *fast])
        assert rc == 0, capsys.readouterr().err
        session = Session(s)
        assert session.state["audit_micrographs"] == ["mic_c"]
        assert session.state["history"][-1]["train"] == ["mic_a", "mic_b"]
        assert len(session.labels.effective()) == 2


def test_front_ends_without_an_audit_micrograph_refuse_the_recipe_up_front(tmp_path):
    import argparse

    from cryoal_ext.napari.controller import LabellingController
    from cryoal_ext.relion.settings import add_arguments, settings_from_args
    from cryoal_ext.relion.star import RelionError

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--o", str(tmp_path / "External" / "job001"), "--recipe", "audited"])
    with pytest.raises(RelionError, match="--recipe: recipe 'audited'.*not yet in the RELION job"):
        settings_from_args(args)
    with pytest.raises(ValueError, match="not yet in the napari plugin"):
        LabellingController(recipe="audited")
    assert not (tmp_path / "External").exists()


def test_training_audits_take_their_place_in_the_batch_and_calibrate_held_out(example_data, feature_cache):
    """audits_on='training': picks of the training micrographs, in place of uncertain proposals, trained on once
    answered, and scored for the calibration by the refit that left out their round (at the pick itself)."""
    from cryoal_ext.calibration import held_out_scores, pick_window, training_audit_map
    from cryoal_ext.extract import extract_picks
    from cryoal_ext.features import FeatureCache
    from cryoal_ext.files import by_micrograph, read_coordinates
    from cryoal_ext.io import load_micrograph
    from cryoal_ext.learner import ActiveLearner, Item
    from cryoal_ext.oracle import Oracle

    cache = FeatureCache(feature_cache, "resnet16_u32", "cpu")
    items = [Item(m, cache.get(m)) for m in (load_micrograph(example_data / "micrographs" / f"{n}.mrc")
                                             for n in ("061_10028_crop", "311_10028_crop"))]
    recipe = get_recipe("default", audits=3, audit_after=16, audits_on="training")
    learner = ActiveLearner(items, 28.0, recipe, "resnet16_u32", seed=3)  # no audit micrograph needed
    oracle = Oracle(by_micrograph(read_coordinates(example_data / "particles.txt")), 28.0, "careful")
    labels, asked = [], []
    learner.fit(labels)
    for rnd in range(5):
        if rnd:  # the audits are picks of the current model on a training micrograph, away from every labelled spot
            props = learner.propose(8, labels)
            for p in (p for p in props if p.kind == "audit"):
                it = learner.items[p.micrograph]
                pk = extract_picks(p.micrograph, learner.model.logit_map(it.fmap.features), it.mic.frame, 28.0)
                assert np.min(np.hypot(pk.x - p.x, pk.y - p.y)) < 1e-6
                assert all(np.hypot(l.x - p.x, l.y - p.y) > 28.0 for l in labels if l.micrograph == p.micrograph)
        else:
            props = learner.initial_proposals(8, labels)
        asked.append(props)
        labels += oracle.answer(props, rnd)
        learner.fit(labels)
    kinds = [[p.kind for p in props] for props in asked]
    assert all("audit" not in k and len(k) == 8 for k in kinds[:2])
    assert all(k.count("audit") == 3 and len(k) == 8 for k in kinds[2:])  # 3 of the batch of 8, not on top
    assert {p.micrograph for props in asked for p in props} <= set(learner.items)
    # answered audits are trained on like any answer
    refit = ActiveLearner(items, 28.0, recipe.with_(audits=0), "resnet16_u32", seed=3)
    assert np.allclose(refit.fit(labels).coef_, learner.model.coef_, atol=1e-6)
    audits = [p for props in asked for p in props if p.kind == "audit"]
    pairs = audit_answers(learner, labels, audits)
    assert len(pairs) == 9
    s = CalibrationSettings(min_answers=12, min_audits=3)
    cal = training_audit_map(learner, labels, audits, s)
    assert cal.audits == 9 and cal.n == 40 and cal.a > 0
    assert calibrate(learner, labels, s, audits=audits) == cal  # the package's calibrate takes this path
    # the audits' logits in that fit: the refit without their round, its highest logit within half a radius
    # of the audited pick (the current model's pick there)
    real = [l for l in labels if l.source != "pseudo"]
    window = {id(l): pick_window(learner, a) for l, a in pairs}
    z, _ = held_out_scores(learner, real, s.folds, learner.model, s.refit_tol,
                           at=[window.get(id(l), [(l.micrograph, l.x, l.y)]) for l in real])
    rnd = next(l.round for l, _ in pairs)
    alone = learner.fit_model([l for l in real if l.round != rnd], learner.model, newton_tol=s.refit_tol)
    one = next(i for i, l in enumerate(real) if l.round == rnd and id(l) in window)
    spots = window[id(real[one])]
    a = next(a for l2, a in pairs if l2 is real[one])
    assert spots[0] == (a.micrograph, a.x, a.y) and len(spots) > 20
    assert all(np.hypot(x - a.x, y - a.y) <= 14.0 + 1e-9 for _, x, y in spots)
    assert z[one] == pytest.approx(float(alone.decision_function(learner.rows(spots)).max()), abs=1e-6)
    # answers that are not audits: at their own spot, as before
    plain = next(i for i, l in enumerate(real) if id(l) not in window and l.round == rnd)
    assert z[plain] == pytest.approx(float(alone.decision_function(learner.rows(
        [(real[plain].micrograph, real[plain].x, real[plain].y)]))[0]), abs=1e-6)
    # too few audits: the uncertain answers' own map
    few = training_audit_map(learner, labels, audits, CalibrationSettings(min_answers=12, min_audits=50))
    assert few.audits == 0 and few.a > 0


def test_labelling_round_of_the_default_keeps_its_training_audits_and_calibrates_on_them(tmp_path, example_data,
                                                                                         feature_cache):
    """The path every front end takes (``workflow.labelling_round``, as the RELION and cryoSPARC jobs and
    ``cryoal round`` call it): the default's audits are saved with the round's proposals, and past the
    calibration's answer gate the saved model's map is refined on them."""
    from cryoal_ext.calibration import of
    from cryoal_ext.features import FeatureCache
    from cryoal_ext.files import by_micrograph, read_coordinates
    from cryoal_ext.io import load_micrograph
    from cryoal_ext.learner import Item
    from cryoal_ext.model import BLR
    from cryoal_ext.oracle import Oracle
    from cryoal_ext.session import Session
    from cryoal_ext.workflow import labelling_round, session_audits

    cache = FeatureCache(feature_cache, "resnet16_u32", "cpu")
    items = [Item(m, cache.get(m)) for m in (load_micrograph(example_data / "micrographs" / f"{n}.mrc")
                                             for n in ("061_10028_crop", "311_10028_crop"))]
    oracle = Oracle(by_micrograph(read_coordinates(example_data / "particles.txt")), 28.0, "careful")
    session = Session(tmp_path / "session")
    recipe = get_recipe("default")
    assert recipe.audits == 3 and recipe.audit_after == 50 and recipe.audits_training
    asked = 0
    for rnd in range(8):
        res = labelling_round(session, items, recipe, 28.0, 10, "resnet16_u32", seed=0)
        kinds = [p.kind for p in res.proposals]
        assert len(kinds) == 10 and kinds.count("audit") == (3 if res.n_labels >= 50 else 0)
        answered = asked
        asked += kinds.count("audit")
        session.labels.add(oracle.answer(res.proposals, rnd))
        session.save_state(round=rnd + 1)
    audits = session_audits(Session(tmp_path / "session"))  # read back from the round files
    assert len(audits) == asked >= 6 and {a.micrograph for a in audits} <= {it.mic.name for it in items}
    # the last round's model was calibrated on the audits answered before it (its own are not answered yet)
    cal = of(BLR.load(session.model_path))
    assert res.n_labels >= 60 and 5 <= cal.audits <= answered and cal.a > 0


def test_audits_per_batch_is_one_setting_every_front_end_takes_and_checks(tmp_path, example_data, capsys):
    """`--audits N` (RELION job, cryoSPARC job, `cryoal round`, pipeliner option, napari 'checks'): the same
    recipe everywhere (recipes.recipe_for), refused up front when it leaves no uncertain question."""
    import argparse

    from cryoal_ext.cli import main
    from cryoal_ext.cryosparc.cli import add_arguments as cs_arguments
    from cryoal_ext.cryosparc.cli import settings_from_args as cs_settings
    from cryoal_ext.napari.controller import LabellingController
    from cryoal_ext.recipes import recipe_for
    from cryoal_ext.relion.settings import add_arguments, settings_from_args
    from cryoal_ext.relion.star import RelionError

    assert recipe_for("default") == get_recipe("default") and recipe_for("head") == get_recipe("head")
    more = recipe_for("default", 6, 10)
    assert more.audits == 6 and more.audits_training and more.with_(audits=3) == get_recipe("default")
    assert recipe_for("head", 2, 10).audits_training and recipe_for("default", 0, 10).audits == 0
    for name, n, batch, why in (("default", 10, 10, r"--audits 10: from 0 to the batch less one \(9\)"),
                                ("default", -1, 10, "--audits -1"), ("audited", 2, 10, "sets its own audits")):
        with pytest.raises(ValueError, match=why):
            recipe_for(name, n, batch)

    p = argparse.ArgumentParser()
    add_arguments(p)
    job = tmp_path / "External" / "job001"
    assert settings_from_args(p.parse_args(["--o", str(job), "--audits", "5"])).audits == 5
    assert settings_from_args(p.parse_args(["--o", str(job)])).audits is None
    with pytest.raises(RelionError, match="--audits 12: from 0 to the batch less one"):
        settings_from_args(p.parse_args(["--o", str(job), "--audits", "12"]))

    p = argparse.ArgumentParser()
    cs_arguments(p)
    base = ["--exposures", "x.cs", "--session", str(tmp_path / "cs"), "--radius-px", "28", "--batch", "8"]
    assert cs_settings(p.parse_args(base + ["--audits", "4"])).engine_recipe().audits == 4
    with pytest.raises(ValueError, match="--audits 8"):
        cs_settings(p.parse_args(base + ["--audits", "8"]))

    assert LabellingController(audits=4).engine_recipe().audits == 4
    with pytest.raises(ValueError, match="--audits 10"):
        LabellingController(batch=10, audits=10)

    sess = tmp_path / "round"
    rc = main(["round", str(example_data / "micrographs"), "--session", str(sess), "--radius-px", "28",
               "--batch", "4", "--audits", "4"])
    assert rc == 1 and "--audits 4: from 0 to the batch less one (3)" in capsys.readouterr().err
    assert not sess.exists() and not (tmp_path / "External").exists() and not (tmp_path / "cs").exists()


def test_pipeliner_passes_the_audits_on_only_when_given():
    pytest.importorskip("pipeliner")
    from cryoal_ext.pipeliner.options import relion_job_arguments
    from pipeliner.job_factory import new_job_of_type

    job = new_job_of_type("cryoal.autopick.active_learning")
    job.joboptions["diameter"].value = "300"
    assert "--audits" not in relion_job_arguments(job.joboptions, "AutoPick/job007/")
    job.joboptions["audits"].value = "6"
    args = relion_job_arguments(job.joboptions, "AutoPick/job007/")
    assert args[args.index("--audits") + 1] == "6"
