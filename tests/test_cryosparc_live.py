"""The live layer at its boundary: cryosparc-tools' real CryoSPARC/controllers over a patched APIClient.

No cryoSPARC instance is contacted.  As in cryosparc-tools' own tests, ``cryosparc.api.APIClient``
is patched so that its endpoint namespaces are mocks; the fixtures here are our own.  The tests
assert the calls the job makes (jobs.create, add_external_input/output, connect, mark_running,
save_output, mark_completed/failed, event and image logs) and what it saves.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import types
from datetime import datetime, timezone
from unittest.mock import MagicMock

import numpy as np
import pytest

pytest.importorskip("cryosparc.tools")
from cryosparc.api import APIClient  # noqa: E402
from cryosparc.dataset import Dataset  # noqa: E402
from cryosparc.models.job import Job  # noqa: E402
from cryosparc.models.job_spec import JobSpec, Output, OutputResult, Outputs  # noqa: E402
from cryosparc.models.project import Project  # noqa: E402
from cryosparc.models.resource import ResourceSpec  # noqa: E402
from cryosparc.tools import CryoSPARC  # noqa: E402

from cryoal_ext.cryosparc import data as csd  # noqa: E402
from cryoal_ext.cryosparc import live as cj  # noqa: E402
from cryoal_ext.cryosparc.job import RoundSettings  # noqa: E402
from cryoal_ext.cli import main as cli  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # the shared fixtures, under any pytest import mode
from test_cryosparc_data import EXAMPLE, make_project  # noqa: E402

PASSWORD = "s3cret-Pa55"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_torch_thread(single_torch_thread):
    """Every test here on one torch thread (conftest's ``single_torch_thread``)."""


def job_model(uid: str, type_: str = "snowflake", outputs: dict | None = None) -> Job:
    outs = {name: Output(type=t, title=name, results=[OutputResult(name=r, dtype=r) for r in results])
            for name, (t, results) in (outputs or {}).items()}
    spec = JobSpec(type=type_, ui_tile_width=1, ui_tile_height=1, resource_spec=ResourceSpec(),
                   outputs=Outputs(root=outs))
    return Job(uid=uid, project_uid="P3", spec=spec, job_dir=uid, job_dir_size_last_updated=NOW,
               uid_num=int(uid[1:]), project_uid_num=3, status_num=0, build_errors=[])


@pytest.fixture
def api(monkeypatch):
    """APIClient whose endpoint namespaces are MagicMocks (no HTTP at all)."""
    ns = {n: MagicMock(name=n) for n in ("users", "config", "projects", "workspaces", "jobs", "assets")}
    monkeypatch.setattr(APIClient, "__call__", lambda self, auth=None: {})
    for name, mock in ns.items():
        monkeypatch.setattr(APIClient, name, mock, raising=False)
    ns["config"].get_version.return_value = "v5.0.3"
    return types.SimpleNamespace(**ns)


@pytest.fixture
def server(api, tmp_path):
    """A fake project P3 with J12 (exposures), J20 (a Manual Picker review) and J21 (Select 2D)."""
    proj, exposures_cs = make_project(tmp_path, sorted((EXAMPLE / "micrographs").glob("*.mrc")))
    exposures = csd.load_dataset(exposures_cs)
    api.projects.find_one.return_value = Project(uid="P3", project_dir=str(proj), owner_user_id="u", title="test",
                                                 size_last_updated=NOW, uid_num=3)
    api.projects.get_directory.return_value = str(proj)
    jobs = {
        "J12": job_model("J12", "curate_exposures_v2", {"exposures_accepted": ("exposure", ["micrograph_blob", "ctf"])}),
        "J20": job_model("J20", "manual_picker_v2", {"particles": ("particle", ["location"])}),
        "J21": job_model("J21", "select_2D", {"particles_excluded": ("particle", ["location", "blob"])}),
        "J30": job_model("J30", "homo_abinit", {"volume": ("volume", ["map"])}),
    }
    ext = job_model("J43")

    def find_one(project_uid, job_uid):
        if job_uid == "J43":
            return ext
        if job_uid not in jobs:
            raise ValueError(f"404 Job {project_uid}-{job_uid} not found")
        return jobs[job_uid]

    api.jobs.find_one.side_effect = find_one
    api.jobs.create.return_value = ext
    for name in ("add_external_input", "add_external_output", "connect", "mark_running", "mark_completed",
                 "mark_failed", "save_output"):
        getattr(api.jobs, name).return_value = ext
    api.jobs.get_directory.return_value = str(proj / "J43")
    inputs: dict[str, Dataset] = {"exposures": exposures}
    api.jobs.load_input.side_effect = lambda p, j, name, slots="all": inputs[name]
    location = [f for f in csd.LOCATION_FIELDS if f[0] != "location/min_dist_A"]  # a server without min_dist_A
    pick = location + csd.PICK_STATS_FIELDS
    api.jobs.get_output_fields.side_effect = lambda p, j, name, dtype_params={}: \
        pick if name in ("particles", "queries") else []
    return types.SimpleNamespace(api=api, proj=proj, exposures=exposures, inputs=inputs, ext=ext)


def client() -> CryoSPARC:
    return cj.connect(cj.ConnectionSettings(base_url="http://cs.example.org:39000", email="me@example.org",
                                            password=PASSWORD))


def settings(tmp_path, **kw) -> RoundSettings:
    cache = os.environ.get("CRYOAL_TEST_CACHE") or str(tmp_path / "features")
    base = dict(radius_px=28.0, cache_dir=cache, batch=6, train_micrographs=1, plots=True)
    base.update(kw)
    return RoundSettings(**base)


def called_names(mock) -> list[str]:
    return [c.args[2] for c in mock.call_args_list]


# --- connection ----------------------------------------------------------------------------------
def test_connect_keywords_5x(api):
    cs = client()
    assert isinstance(cs, CryoSPARC) and cs.base_url == "http://cs.example.org:39000"
    api.users.me.assert_called_once()
    cs2 = cj.connect(cj.ConnectionSettings(host="csmaster", base_port=39100, email="me@x", password=PASSWORD))
    assert cs2.base_url == "http://csmaster:39100"


def test_connect_keywords_4x_style_factory():
    seen = {}

    class Old:  # cryosparc-tools 4.x: CryoSPARC(license, host, base_port, email, password, timeout)
        def __init__(self, license=None, host="localhost", base_port=39000, email=None, password=None, timeout=300):
            seen.update(license=license, host=host, base_port=base_port, email=email, password=password)

    cj.connect(cj.ConnectionSettings(base_url="http://old.example.org:39000", email="e", password="p",
                                     license="lic"), factory=Old)
    assert seen == {"license": "lic", "host": "old.example.org", "base_port": 39000, "email": "e", "password": "p"}


def test_dir_property_and_method():
    class V5:
        from pathlib import PurePosixPath

        dir = PurePosixPath("/data/P3")

    class V4:
        def dir(self):
            return "/data/P3"

    assert cj.dir_of(V5()) == cj.dir_of(V4()) == "/data/P3"


def test_cannot_connect_message_has_no_password(monkeypatch):
    def refuse(self, auth=None):
        raise ConnectionError(f"connection refused (auth {auth})")

    monkeypatch.setattr(APIClient, "__call__", refuse)
    with pytest.raises(cj.CryoSPARCLiveError) as err:
        client()
    msg = str(err.value)
    assert "cannot connect to cryoSPARC at http://cs.example.org:39000 as me@example.org" in msg
    assert PASSWORD not in msg and hashlib.sha256(PASSWORD.encode()).hexdigest() not in msg
    assert PASSWORD not in repr(cj.ConnectionSettings(password=PASSWORD))


def test_connection_settings_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    cfg = tmp_path / "cs.yaml"
    cfg.write_text(f"url: http://from-file:39000\nemail: file@x\npassword_file: {pw}\n")
    os.chmod(cfg, 0o600)
    ns = argparse.Namespace(config=str(cfg), url=None, host=None, port=None, email=None, password_file=None)
    c = cj.connection_settings(ns, env={})
    assert (c.url, c.email, c.password) == ("http://from-file:39000", "file@x", PASSWORD)
    env = {"CRYOSPARC_MASTER_HOSTNAME": "envhost", "CRYOSPARC_BASE_PORT": "39200", "CRYOSPARC_PASSWORD": "envpw"}
    c = cj.connection_settings(ns, env=env)
    assert (c.url, c.email, c.password) == ("http://envhost:39200", "file@x", "envpw")
    ns.url, ns.email = "http://flag:39000", "flag@x"
    c = cj.connection_settings(ns, env=env)
    assert (c.url, c.email, c.origin["base_url"], c.origin["password"]) == ("http://flag:39000", "flag@x", "flags",
                                                                             "environment")
    assert PASSWORD not in c.describe() and "envpw" not in c.describe()
    with pytest.raises(ValueError, match="no cryoSPARC address"):
        cj.connection_settings(argparse.Namespace(config=None), env={})
    with pytest.raises(ValueError, match="connection file not found"):
        cj.connection_settings(argparse.Namespace(config=str(tmp_path / "none.yaml")), env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("url: http://x\npasword: typo\n")
    with pytest.raises(ValueError, match="unknown setting.*pasword"):
        cj.connection_settings(argparse.Namespace(config=str(bad)), env={})


# --- clear errors before any job is created ------------------------------------------------------
@pytest.mark.parametrize("live, message", [
    (dict(project="P9"), "unknown project P9"),
    (dict(exposures_job="J99"), "unknown job J99 in project P3"),
    (dict(exposures_output="exposures"), "J12 has no output 'exposures' \\(outputs: exposures_accepted\\)"),
    (dict(exposures_job="J20", exposures_output="particles"), "J20.particles has no slot 'micrograph_blob'"),
    (dict(negatives=[("J30", "volume")]), "J30.volume has no slot 'location'"),
])
def test_live_errors(server, tmp_path, live, message):
    if live.get("project") == "P9":
        server.api.projects.find_one.side_effect = ValueError("404 project P9 not found")
    spec = dict(project="P3", workspace="W1", exposures_job="J12", exposures_output="exposures_accepted")
    spec.update(live)
    with pytest.raises(cj.CryoSPARCLiveError, match=message):
        cj.run_live(client(), cj.LiveSpec(**spec), str(tmp_path / "s"), settings(tmp_path))
    server.api.jobs.create.assert_not_called()


# --- a whole round as an external job ------------------------------------------------------------
def test_live_round_then_review_then_predict(server, tmp_path, capsys):
    api = server.api
    sess = tmp_path / "session"
    live = cj.LiveSpec(project="P3", workspace="W1", exposures_job="J12", exposures_output="exposures_accepted")
    out = cj.run_live(client(), live, str(sess), settings(tmp_path))

    api.jobs.create.assert_called_once()
    assert api.jobs.create.call_args.args == ("P3", "W1")
    kw = api.jobs.create.call_args.kwargs
    assert kw["type"] == "snowflake" and kw["title"] == live.title and "labelling round" in kw["description"]
    spec = api.jobs.add_external_input.call_args_list[0].args[3]
    assert called_names(api.jobs.add_external_input) == ["exposures"]
    assert spec.type == "exposure" and [s.name for s in spec.slots] == ["micrograph_blob"] and spec.count_min == 1
    api.jobs.connect.assert_called_once_with("P3", "J43", "exposures", source_job_uid="J12",
                                             source_output_name="exposures_accepted")
    assert called_names(api.jobs.add_external_output) == ["particles", "queries"]
    outs = {c.args[2]: c.args[3] for c in api.jobs.add_external_output.call_args_list}
    assert [s.name for s in outs["particles"].slots] == ["location", "pick_stats"]
    assert outs["queries"].type == "particle"
    api.jobs.mark_running.assert_called_once_with("P3", "J43", status="running")
    api.jobs.mark_completed.assert_called_once_with("P3", "J43")
    api.jobs.mark_failed.assert_not_called()
    saved = {c.args[2]: c.args[3] for c in api.jobs.save_output.call_args_list}
    assert list(saved) == ["particles", "queries"]
    assert all(c.kwargs == {"version": 0} for c in api.jobs.save_output.call_args_list)
    q = saved["queries"]
    assert len(q) == 6 and set(q["uid"]) == set(out.queries["uid"])  # the session copy has the same uids
    local = csd.load_dataset(sess / "cryosparc" / "round_000" / "queries.cs")
    np.testing.assert_array_equal(local["uid"], q["uid"])
    np.testing.assert_allclose(local["location/center_x_frac"], q["location/center_x_frac"])
    assert "location/min_dist_A" not in q.fields()  # this server did not ask for it
    texts = [c.args[2] for c in api.jobs.add_event_log.call_args_list]
    assert any("external job J43" in t for t in texts) and any("min_dist_A" in t for t in texts)
    assert api.jobs.add_image_log.call_count >= 2  # histogram + overlay
    assert api.jobs.update_event_log.called or any(t.startswith("features") for t in texts)

    # round 1: the queries came back from a Manual Picker job (J20): one deleted, one added
    kept = q.mask(np.arange(len(q)) != 0)
    spec0 = next(s for s in csd.exposures_to_specs(server.exposures, server.proj)
                 if s.extra["uid"] == int(q["location/micrograph_uid"][0]))
    new = csd.picks_to_dataset([csd.PickRows(spec0, np.array([256.0]), np.array([256.0]), np.array([0.0]))], 28.0)
    reviewed = Dataset.append(kept, Dataset({f: new[f] for f in kept.fields()}))
    server.inputs["reviewed"] = reviewed
    server.inputs["negatives"] = Dataset()
    for m in vars(api).values():
        m.reset_mock(return_value=False, side_effect=False)
    live1 = cj.LiveSpec(project="P3", workspace="W1", exposures_job="J12", exposures_output="exposures_accepted",
                        reviewed=("J20", "particles"), negatives=[("J21", "particles_excluded")])
    out1 = cj.run_live(client(), live1, str(sess), settings(tmp_path))
    assert called_names(api.jobs.add_external_input) == ["exposures", "reviewed", "negatives"]
    assert [c.kwargs["source_job_uid"] for c in api.jobs.connect.call_args_list] == ["J12", "J20", "J21"]
    r = out1.summary["inputs"]["J20.particles"]
    assert (r["positive"], r["negative"], r["uids_shared"]) == (6, 1, 5)
    assert out1.summary["labels"] == 7 and out1.round == 1

    # final: --predict, one particles output over every exposure
    for m in vars(api).values():
        m.reset_mock(return_value=False, side_effect=False)
    out2 = cj.run_live(client(), live, str(sess), settings(tmp_path, predict=True))
    assert called_names(api.jobs.add_external_output) == ["particles"]
    saved = {c.args[2]: c.args[3] for c in api.jobs.save_output.call_args_list}
    assert list(saved) == ["particles"]
    assert set(np.unique(saved["particles"]["location/micrograph_uid"])) == set(int(u) for u in server.exposures["uid"])
    assert out2.queries is None and len(saved["particles"]) == len(out2.particles) > 0
    api.jobs.mark_completed.assert_called_once()


def test_live_failure_marks_job_failed(server, tmp_path):
    live = cj.LiveSpec(project="P3", workspace="W1", exposures_job="J12", exposures_output="exposures_accepted",
                       project_dir=str(tmp_path / "not_the_project"))
    with pytest.raises(csd.CryoSPARCDataError, match="exposure file not found"):
        cj.run_live(client(), live, str(tmp_path / "s"), settings(tmp_path))
    server.api.jobs.mark_running.assert_called_once()
    server.api.jobs.mark_failed.assert_called_once()
    assert "exposure file not found" in server.api.jobs.mark_failed.call_args.kwargs["error"]
    server.api.jobs.save_output.assert_not_called()


def test_cli_live_reads_env_and_never_prints_password(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CRYOSPARC_BASE_URL", "http://cs.example.org:39000")
    monkeypatch.setenv("CRYOSPARC_EMAIL", "me@example.org")
    monkeypatch.setenv("CRYOSPARC_PASSWORD", PASSWORD)
    cache = os.environ.get("CRYOAL_TEST_CACHE") or str(tmp_path / "features")
    rc = cli(["cryosparc", "--project", "P3", "--workspace", "W1", "--exposures-job", "J12", "--exposures-output",
              "exposures_accepted", "--session", str(tmp_path / "s"), "--radius-px", "28", "--cache-dir", cache,
              "--train-micrographs", "1", "--batch", "3", "--no-plots", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr()
    assert "connecting to http://cs.example.org:39000 as me@example.org with a password" in out.out
    assert PASSWORD not in out.out + out.err
    assert "external job J43" in out.out
    # and without a project the command says what is missing
    assert cli(["cryosparc", "--exposures-job", "J12", "--session", str(tmp_path / "s"), "--radius-px", "28"]) == 1
    assert "live mode needs --project --workspace" in capsys.readouterr().err
