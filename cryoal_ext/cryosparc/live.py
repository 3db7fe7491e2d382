"""The live cryoSPARC job: connection settings (config file, password), cryosparc-tools calls, one round.

A thin shell over cryosparc-tools' public API; the round itself is ``job.run_round``, the same
as offline.  Secrets never appear in a repr or a message.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from .data import copy_into
from .job import LabelInput, Reporter, RoundOutput, RoundSettings, run_round

CONFIG_ENV = "CRYOAL_CRYOSPARC_CONFIG"
DEFAULT_CONFIG = Path("~/.config/cryoal/cryosparc.yaml")


class CryoSPARCLiveError(RuntimeError):
    """A problem talking to a cryoSPARC instance (connection, unknown project/job, missing output or slot)."""


# --- connection (live) --------------------------------------------------------------------------
@dataclass
class ConnectionSettings:
    """How to reach cryoSPARC; secrets never appear in repr or messages."""

    base_url: str | None = None
    host: str | None = None
    base_port: int | None = None
    email: str | None = None
    password: str | None = field(default=None, repr=False)
    license: str | None = field(default=None, repr=False)
    origin: dict = field(default_factory=dict)  # setting -> where it came from (flag, env, file)

    @property
    def url(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"http://{self.host or 'localhost'}:{int(self.base_port or 39000)}"

    def host_port(self) -> tuple[str, int]:
        if self.base_url:
            from urllib.parse import urlparse

            u = urlparse(self.base_url if "://" in self.base_url else f"http://{self.base_url}")
            return u.hostname or "localhost", int(u.port or 39000)
        return self.host or "localhost", int(self.base_port or 39000)

    def describe(self) -> str:
        who = self.email or "(saved cryosparc-tools login)"
        return f"{self.url} as {who}" + (" with a password" if self.password else "")


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except Exception as exc:
        raise ValueError(f"{path}: not a readable YAML file ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of connection settings")
    known = {"url", "base_url", "host", "port", "base_port", "email", "password", "password_file", "license"}
    bad = set(data) - known
    if bad:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(known))})")
    if data.get("password") and os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        import warnings

        warnings.warn(f"{path} holds a password and is readable by others: chmod 600 {path}")
    return data


def _read_password_file(path: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"password file not found: {p}")
    return p.read_text().rstrip("\r\n")


def connection_settings(args, env: dict | None = None) -> ConnectionSettings:
    """Flags win over the environment, which wins over the YAML file (--config, $CRYOAL_CRYOSPARC_CONFIG,
    or ~/.config/cryoal/cryosparc.yaml).  There is deliberately no --password flag."""
    env = os.environ if env is None else env
    layers: list[tuple[str, dict]] = []
    cfg = getattr(args, "config", None) or env.get(CONFIG_ENV)
    path = Path(cfg).expanduser() if cfg else DEFAULT_CONFIG.expanduser()
    if cfg and not path.exists():
        raise ValueError(f"cryoSPARC connection file not found: {path}")
    if path.exists():
        y = _read_yaml(path)
        if y.get("password_file"):
            y["password"] = _read_password_file(str(y["password_file"]))
        layers.append((f"file {path}", {"base_url": y.get("base_url") or y.get("url"), "host": y.get("host"),
                                        "base_port": y.get("base_port") or y.get("port"), "email": y.get("email"),
                                        "password": y.get("password"), "license": y.get("license")}))
    layers.append(("environment", {"base_url": env.get("CRYOSPARC_BASE_URL"),
                                   "host": env.get("CRYOSPARC_MASTER_HOSTNAME"),
                                   "base_port": env.get("CRYOSPARC_BASE_PORT"), "email": env.get("CRYOSPARC_EMAIL"),
                                   "password": env.get("CRYOSPARC_PASSWORD"),
                                   "license": env.get("CRYOSPARC_LICENSE_ID")}))
    pw_file = getattr(args, "password_file", None)
    layers.append(("flags", {"base_url": getattr(args, "url", None), "host": getattr(args, "host", None),
                             "base_port": getattr(args, "port", None), "email": getattr(args, "email", None),
                             "password": _read_password_file(pw_file) if pw_file else None, "license": None}))
    out = ConnectionSettings()
    for origin, vals in layers:
        if vals.get("base_url") and (vals.get("host") or vals.get("base_port")):
            raise ValueError(f"{origin}: give either a URL or a host and port, not both")
        for key, value in vals.items():
            if value in (None, ""):
                continue
            if key == "base_url":
                out.host, out.base_port = None, None
            elif key in ("host", "base_port"):
                out.base_url = None
            setattr(out, key, int(value) if key == "base_port" else str(value))
            out.origin[key] = origin
    if not (out.base_url or out.host):
        raise ValueError("no cryoSPARC address: give --url (or --host/--port), $CRYOSPARC_BASE_URL, or a "
                         f"connection file ({DEFAULT_CONFIG})")
    return out


def _scrub(text: str, c: ConnectionSettings) -> str:
    for secret in (c.password, c.license):
        if secret:
            text = text.replace(secret, "***").replace(hashlib.sha256(secret.encode()).hexdigest(), "***")
    return text


def _short(exc: BaseException, c: ConnectionSettings | None = None) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return _scrub(text, c) if c else text


def connect(c: ConnectionSettings, factory=None):
    """A CryoSPARC client, with keyword arguments that suit cryosparc-tools 5.x (base_url) and 4.x (license)."""
    if factory is None:
        from cryosparc.tools import CryoSPARC as factory
    params = inspect.signature(factory.__init__).parameters
    # every keyword is passed explicitly: cryosparc-tools evaluates its env defaults at import time
    if "base_url" in params:
        kw = {"base_url": c.base_url, "host": None, "base_port": None} if c.base_url else \
            {"base_url": None, "host": c.host or "localhost", "base_port": int(c.base_port or 39000)}
        if c.license:
            kw["license"] = c.license
    else:  # cryosparc-tools 4.x: CryoSPARC(license, host, base_port, email, password)
        host, port = c.host_port()
        kw = {"host": host, "base_port": port, "license": c.license}
    kw.update(email=c.email, password=c.password)
    try:
        return factory(**kw)
    except Exception as exc:
        raise CryoSPARCLiveError(f"cannot connect to cryoSPARC at {c.describe()}: {_short(exc, c)}") from None


def dir_of(obj) -> str:
    """Project/job directory: a property in cryosparc-tools 5.x, a method in 4.x."""
    d = getattr(obj, "dir")
    if isinstance(d, (str, PurePath)):
        return str(d)
    return str(d())


def find_project(cs, project_uid: str):
    try:
        return cs.find_project(project_uid)
    except Exception as exc:
        raise CryoSPARCLiveError(f"unknown project {project_uid} ({_short(exc)})") from None


def check_workspace(project, workspace_uid: str) -> None:
    finder = getattr(project, "find_workspace", None)
    if finder is None:
        return
    try:
        finder(workspace_uid)
    except Exception as exc:
        raise CryoSPARCLiveError(f"unknown workspace {workspace_uid} in project {project.uid} "
                                 f"({_short(exc)})") from None


def find_job(project, job_uid: str):
    try:
        return project.find_job(job_uid)
    except Exception as exc:
        raise CryoSPARCLiveError(f"unknown job {job_uid} in project {project.uid} ({_short(exc)})") from None


def output_results(job, output: str) -> list[str] | None:
    """Slots (results) of a job output, or None when this cryosparc-tools cannot tell.

    Raises a clear error when the output itself does not exist.
    """
    names, slots = None, None
    outs = getattr(job, "outputs", None)
    if isinstance(outs, dict):  # 5.x models
        names = list(outs)
        if output in outs:
            slots = [r.name for r in getattr(outs[output], "results", [])]
    else:
        doc = getattr(job, "doc", None)  # 4.x documents
        if isinstance(doc, dict):
            names = [g.get("name") for g in doc.get("output_result_groups", [])]
            slots = [r.get("name") for r in doc.get("output_results", []) if r.get("group_name") == output]
    if names is not None and output not in names:
        raise CryoSPARCLiveError(f"job {job.uid} has no output {output!r} (outputs: {', '.join(names) or 'none'})")
    return slots or None


def check_output(job, output: str, slot: str) -> None:
    slots = output_results(job, output)
    if slots is not None and slot not in slots:
        raise CryoSPARCLiveError(f"{job.uid}.{output} has no slot {slot!r} (slots: {', '.join(slots)})")


class JobReporter(Reporter):
    """Log lines, a progress line updated in place, and plots in the external job's event log."""

    def __init__(self, job):
        self.job = job
        self._named = "name" in inspect.signature(job.log).parameters

    def log(self, text: str, level: str = "text") -> None:
        print(text, flush=True)
        self.job.log(text, level=level)

    def progress(self, text: str) -> None:
        print(text, flush=True)
        if self._named:
            self.job.log(text, name="progress")
        else:
            self.job.log(text)

    def plot(self, path: str, caption: str) -> None:
        self.job.log_plot(path, caption, formats=["png"])


@dataclass
class LiveSpec:
    """What to read from and write to the cryoSPARC project."""

    project: str
    workspace: str
    exposures_job: str
    exposures_output: str = "exposures"
    reviewed: tuple[str, str] | None = None  # (job, output)
    positives: list[tuple[str, str]] = field(default_factory=list)
    negatives: list[tuple[str, str]] = field(default_factory=list)
    title: str = "cryoAL active-learning picker"
    project_dir: str | None = None  # as this node sees it; default: the project's directory


def run_live(cs, live: LiveSpec, session_dir: str, s: RoundSettings,
             extra_inputs: list[LabelInput] = ()) -> RoundOutput:
    """Create the external job, connect its inputs, run one round inside ``job.run()``, save its outputs."""
    project = find_project(cs, live.project)
    check_workspace(project, live.workspace)
    src = find_job(project, live.exposures_job)
    check_output(src, live.exposures_output, "micrograph_blob")
    connections = []  # (input name, job, output, kind)
    if live.reviewed:
        connections.append(("reviewed", *live.reviewed, "reviewed"))
    for kind, pairs in (("positive", live.positives), ("negative", live.negatives)):
        connections += [(f"{kind}s_{i}" if i else f"{kind}s", j, o, kind) for i, (j, o) in enumerate(pairs)]
    for _, j, o, _ in connections:
        check_output(find_job(project, j), o, "location")

    mode = "final picks" if s.predict else "labelling round"
    job = project.create_external_job(live.workspace, title=live.title,
                                      desc=f"cryoal_ext {mode}; session {os.path.abspath(session_dir)}")
    job.connect("exposures", live.exposures_job, live.exposures_output, slots=["micrograph_blob"])
    for name, j, o, _ in connections:
        job.connect(name, j, o, slots=["location"])
    job.add_output("particle", "particles", slots=["location", "pick_stats"], title="Particles (cryoAL picks)")
    if not s.predict:
        job.add_output("particle", "queries", slots=["location", "pick_stats"],
                       title="Queries: review in Manual Picker, then run the next round")
    reporter = JobReporter(job)
    with job.run():
        reporter.log(f"external job {job.uid} ({dir_of(job)}): {mode}")
        exposures = job.load_input("exposures")
        inputs = [LabelInput(job.load_input(name), f"{j}.{o}", kind) for name, j, o, kind in connections]
        project_dir = live.project_dir or dir_of(project)
        out = run_round(session_dir, exposures, project_dir, list(extra_inputs) + inputs, s, reporter,
                        exposures_source=f"{live.exposures_job}.{live.exposures_output}")
        for name, dset in (("particles", out.particles), ("queries", out.queries)):
            if dset is None:
                continue
            alloc = job.alloc_output(name, dset["uid"])
            skipped = copy_into(alloc, dset)
            if skipped:
                reporter.log(f"{name}: this cryoSPARC has no field(s) {', '.join(skipped)}; left out", level="warning")
            job.save_output(name, alloc)
        reporter.log(f"saved outputs: particles ({len(out.particles)})"
                     + ("" if out.queries is None else f", queries ({len(out.queries)})")
                     + f"; connect them with the micrographs of {live.exposures_job}.{live.exposures_output}")
    out.summary["job"] = job.uid
    return out
