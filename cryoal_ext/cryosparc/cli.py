"""cryoSPARC: one active-learning round per run, as an external job (cryosparc-tools) or offline on .cs files.

Offline:  cryoal cryosparc --exposures exposures.cs --project-dir P --session S --radius-px 28 --out queries.cs
Live:     cryoal cryosparc --project P3 --workspace W1 --exposures-job J12 --session S --radius-px 28

Every run is one round kept in the session folder (labels are only ever appended, a re-run
resumes): labels come in (the reviewed queries of the last round, extra positives/negatives),
the model is refitted, and a ``queries`` particle set goes out for the next review in Manual
Picker, with the current picks as ``particles``.  ``--predict`` picks every exposure instead.
The live layer is a thin shell over cryosparc-tools' public API; all data handling is shared
with the offline mode (``cryoal_ext.cryosparc.data``, ``.job``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .data import load_dataset, save_dataset
from .job import LabelInput, Reporter, RoundSettings, run_round
from .live import CONFIG_ENV, DEFAULT_CONFIG, LiveSpec, connect, connection_settings, run_live

# --- command line -------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..commands.common import add_audits_argument, add_engine_arguments, add_size_arguments
    from ..validate import positive_int, probability

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--exposures", help="offline: exposures .cs file, e.g. <project>/J12/J12_exposures_accepted.cs")
    src.add_argument("--exposures-job", help="live: job uid whose output gives the exposures, e.g. J12")
    p.add_argument("--session", required=True, help="session folder (labels, model, queries shown); a re-run resumes")
    add_size_arguments(p)
    p.add_argument("--project-dir", default=None,
                   help="the cryoSPARC project folder as this node sees it (micrograph_blob/path is relative to it); "
                        "offline default: the current folder; live default: the project's directory")
    p.add_argument("--predict", action="store_true", help="final run: (re)fit on every label and pick every exposure")
    p.add_argument("--threshold", type=probability, default=0.01,
                   help="lowest probability written to particles (default %(default)s; threshold in Inspect Picks)")
    p.add_argument("--model", default=None, help="with --predict: pick with this model.npz instead of the session's")
    p.add_argument("--flip-y", action="store_true",
                   help="center_y_frac = 1 - y/ny (only if picks land mirrored top-bottom; fixed per session)")
    p.add_argument("--with-psize", action="store_true", help="also write location/micrograph_psize_A")
    p.add_argument("--batch", type=positive_int, default=10, help="queries per round (default %(default)s)")
    p.add_argument("--train-micrographs", type=positive_int, default=2,
                   help="micrographs queried per round (default %(default)s)")
    p.add_argument("--recipe", default="default")
    add_audits_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip overlays and histograms")

    off = p.add_argument_group("offline (.cs files)")
    off.add_argument("--out", help="offline: write queries (or, with --predict, picks) to this .cs file")
    off.add_argument("--picks", default=None,
                     help="offline round: also write the current picks on the queried micrographs")
    off.add_argument("--reviewed", default=None, help="the last round's queries after review in Manual Picker (.cs)")
    off.add_argument("--positives", action="append", default=[], help="particles (.cs) to add as positives")
    off.add_argument("--negatives", action="append", default=[], help="particles (.cs) to add as negatives "
                                                                       "(e.g. Select 2D's particles_excluded)")

    live = p.add_argument_group("live (cryoSPARC instance through cryosparc-tools)")
    live.add_argument("--project", help="project uid, e.g. P3")
    live.add_argument("--workspace", help="workspace uid for the external job, e.g. W1")
    live.add_argument("--exposures-output", default="exposures", help="output of --exposures-job (default %(default)s)")
    live.add_argument("--reviewed-job", help="Manual Picker job in which the last queries were reviewed")
    live.add_argument("--reviewed-output", default="particles", help="(default %(default)s)")
    live.add_argument("--positives-job", "--particles-job", dest="positives_job", action="append", default=[],
                      help="job whose particles are positives (repeatable)")
    live.add_argument("--positives-output", default="particles", help="(default %(default)s)")
    live.add_argument("--negatives-job", action="append", default=[], help="job whose particles are negatives")
    live.add_argument("--negatives-output", default="particles_excluded", help="(default %(default)s)")
    live.add_argument("--title", default="cryoAL active-learning picker", help="external job title")
    conn = p.add_argument_group("connection (flags > environment > YAML file; no password flag)")
    conn.add_argument("--config", default=None, help=f"YAML file with url/host/port/email/password_file "
                                                     f"(default ${CONFIG_ENV} or {DEFAULT_CONFIG})")
    conn.add_argument("--url", default=None, help="cryoSPARC web address, e.g. http://cs.example.org:39000")
    conn.add_argument("--host", default=None)
    conn.add_argument("--port", type=int, default=None, help="cryoSPARC base port (default 39000)")
    conn.add_argument("--email", default=None)
    conn.add_argument("--password-file", default=None, help="file holding the password (or $CRYOSPARC_PASSWORD, "
                                                           "or a saved `python -m cryosparc.tools login`)")
    add_engine_arguments(p)


def settings_from_args(args) -> RoundSettings:
    from ..recipes import offered_in, recipe_for

    recipe_for(offered_in(args.recipe, "the cryoSPARC job"), args.audits, args.batch)
    return RoundSettings(radius_px=args.radius_px, diameter_A=args.diameter_A, feature_model=args.feature_model,
                         working_pixel_size=args.working_pixel_size, cache_dir=args.cache_dir, device=args.device,
                         pixel_size=args.pixel_size, batch=args.batch, train_micrographs=args.train_micrographs,
                         recipe=args.recipe, audits=args.audits, seed=args.seed, flip_y=args.flip_y,
                         threshold=args.threshold if args.threshold and args.threshold > 0 else None,
                         predict=args.predict, model=args.model, with_psize=args.with_psize, plots=not args.no_plots)


def _file_inputs(args) -> list[LabelInput]:
    out = []
    if args.reviewed:
        out.append(LabelInput(load_dataset(args.reviewed, "reviewed particles"), str(args.reviewed), "reviewed"))
    out += [LabelInput(load_dataset(f, "positive particles"), str(f), "positive") for f in args.positives]
    out += [LabelInput(load_dataset(f, "negative particles"), str(f), "negative") for f in args.negatives]
    return out


def main(args) -> int:
    from ..commands.common import apply_threads

    from ..validate import check_writable

    apply_threads(args)
    s = settings_from_args(args)
    check_writable(args.session, "session folder (--session)")
    check_writable(args.cache_dir, "feature cache folder (--cache-dir)")
    for f in (args.out, args.picks):
        if f:
            check_writable(Path(f).parent, f"folder of {f}")
    if s.model and not s.predict:
        raise ValueError("--model is only used with --predict")
    if args.exposures:
        if not args.out:
            raise ValueError("offline mode needs --out FILE.cs")
        if args.picks and s.predict:
            raise ValueError("with --predict the picks go to --out; drop --picks")
        exposures = load_dataset(args.exposures, "exposures")
        project_dir = args.project_dir or os.getcwd()
        out = run_round(args.session, exposures, project_dir, _file_inputs(args), s, Reporter(),
                        exposures_source=str(args.exposures))
        if s.predict:
            save_dataset(args.out, out.particles)
            print(f"{len(out.particles)} picks -> {args.out} (session copy {out.folder / 'particles.cs'})")
        else:
            save_dataset(args.out, out.queries)
            print(f"{len(out.queries)} queries -> {args.out}: open them in Manual Picker (or edit), then run the "
                  f"next round with --reviewed <edited.cs>")
            if args.picks:
                save_dataset(args.picks, out.particles)
                print(f"{len(out.particles)} picks -> {args.picks}")
        return 0
    missing = [f for f in ("project", "workspace") if not getattr(args, f)]
    if missing:
        raise ValueError(f"live mode needs --{' --'.join(missing)}")
    if args.out or args.picks:
        raise ValueError("--out/--picks are for offline mode (--exposures FILE.cs); live results are job outputs")
    live = LiveSpec(project=args.project, workspace=args.workspace, exposures_job=args.exposures_job,
                    exposures_output=args.exposures_output,
                    reviewed=(args.reviewed_job, args.reviewed_output) if args.reviewed_job else None,
                    positives=[(j, args.positives_output) for j in args.positives_job],
                    negatives=[(j, args.negatives_output) for j in args.negatives_job],
                    title=args.title, project_dir=args.project_dir)
    c = connection_settings(args)
    print(f"connecting to {c.describe()}", flush=True)
    cs = connect(c)
    out = run_live(cs, live, args.session, s, _file_inputs(args))
    print(f"external job {out.summary.get('job')}: outputs particles"
          + ("" if out.queries is None else " and queries") + f"; session {args.session}")
    return 0
