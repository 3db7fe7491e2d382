#!/usr/bin/env python3
"""The CCP-EM pipeliner example of docs/pipeliner.md, on the bundled EMPIAR-10028 crops.

A new pipeliner project; RELION's Import of the three micrographs; one active-learning round; the
round's queries reviewed through Doppio's pick-editing job (a simulated user who keeps proposals
on a true particle, deletes the others and adds one missed particle); the job continued with the
edited picks (round 1); continued once more as the final run; RELION's Extract on the picks.

    PATH=/path/to/relion/bin:$PATH python scripts/pipeliner_example.py /tmp/cryoal_pipeliner_example

Needs the ``pipeliner`` extra and RELION's relion_import and relion_preprocess on PATH.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from pipeliner.api.manage_project import PipelinerProject
from pipeliner.starfile_handler import StarFile

import cryoal_ext
from cryoal_ext.relion.coordinates import read_coordinate_list, read_mic_coordinates
from cryoal_ext.relion.star import read_star

EXAMPLE = Path(cryoal_ext.__file__).parent / "example_data" / "empiar10028_small"
RADIUS_PX = 28.0  # particle radius in pixels of the crops (300 A at 5.36 A/px)


def true_particles() -> dict[str, np.ndarray]:
    rows = [line.split() for line in (EXAMPLE / "particles.txt").read_text().splitlines()[1:] if line.strip()]
    out: dict[str, list] = {}
    for name, x, y in rows:
        out.setdefault(name, []).append((float(x), float(y)))
    return {k: np.array(v) for k, v in out.items()}


def review(queries_star: str) -> dict:
    """What a user would save in Doppio's pick editor: the true proposals, plus one missed particle."""
    truth = true_particles()
    images = []
    for mic, coords in read_coordinate_list(queries_star).items():
        q = read_mic_coordinates(coords)
        t = truth[Path(mic).stem]
        near = lambda x, y: np.hypot(t[:, 0] - x, t[:, 1] - y).min() <= RADIUS_PX / 2  # noqa: E731
        kept = [{"x": float(x), "y": float(y)} for x, y in zip(q.x, q.y) if near(x, y)]
        far = [p for p in t if np.hypot(q.x - p[0], q.y - p[1]).min() > 2 * RADIUS_PX]
        added = [{"x": float(far[0][0]), "y": float(far[0][1])}] if far else []
        print(f"review {mic}: {len(q.x)} proposals, kept {len(kept)}, deleted {len(q.x) - len(kept)}, "
              f"added {len(added)}")
        images.append({"name": mic, "coords": kept + added})
    return {"images": images}


def continue_with(project: PipelinerProject, job_name: str, **options: str) -> None:
    """Set options of the continuation (as Doppio's Continue form does) and run it."""
    job = project.get_continuation_job(job_name)
    for key, value in options.items():
        job.joboptions[key].value = value
    job.write_jobstar(job.output_dir, "continue_job.star", is_continue=True)
    project.continue_job(job_name, run_in_foreground=True)
    status = project.wait_for_job_to_finish(job_name, error_on_fail=True)
    summary = json.loads(Path(job_name, "summary.json").read_text())
    print(f"{job_name}: continued ({', '.join(f'{k}={v}' for k, v in options.items())}) {status}: "
          f"{summary['mode']} run, round {summary['round']}, labels {summary['labels']}")


def run(project: PipelinerProject, params: dict) -> str:
    job = project.run_job(params, run_in_foreground=True)
    status = project.wait_for_job_to_finish(job, error_on_fail=True)
    print(f"{job.output_dir}: {params['_rlnJobTypeLabel']} {status}")
    return job.output_dir


def main(project_dir: str) -> None:
    Path(project_dir).mkdir(parents=True)
    os.chdir(project_dir)
    Path("Micrographs").mkdir()
    for mrc in sorted((EXAMPLE / "micrographs").glob("*.mrc")):
        os.symlink(mrc, Path("Micrographs") / mrc.name)
    project = PipelinerProject(make_new_project=True)

    imported = run(project, {"_rlnJobTypeLabel": "relion.import.movies", "fn_in_raw": "Micrographs/*.mrc",
                             "is_multiframe": "No", "angpix": 5.36, "kV": 300, "Cs": 2.7, "Q0": 0.1})
    mics = imported + "micrographs.star"

    picker = run(project, {"_rlnJobTypeLabel": "cryoal.autopick.active_learning", "input_mics": mics,
                           "diameter": 300, "batch": 6, "feature_model": "resnet16_u32", "device": "cpu",
                           "nr_threads": 2})

    # the user reviews the queries in Doppio's pick editor; Doppio saves the edits as a json upload
    Path("DoppioUploads").mkdir()
    Path("DoppioUploads/edits.json").write_text(json.dumps(review(picker + "queries.star")))
    edited = run(project, {"_rlnJobTypeLabel": "doppio.manualpick.edit", "coords_file": "DoppioUploads/edits.json",
                           "autopick_file": picker + "queries.star"})

    continue_with(project, picker, input_coords=edited + "picked_particles.star")  # round 1
    continue_with(project, picker, do_predict="Yes")  # final run: picks on every micrograph

    summary = json.loads(Path(picker, "summary.json").read_text())
    print(f"final picks: {summary['picks']} at probability >= {summary['threshold']}; labels {summary['labels']}")

    extracted = run(project, {"_rlnJobTypeLabel": "relion.extract", "star_mics": mics,
                              "coords_suffix": picker + "autopick.star", "extract_size": 64,
                              "do_invert": "Yes", "do_norm": "Yes", "bg_diameter": 56, "nr_mpi": 1})
    n = StarFile(extracted + "particles.star").count_block("particles")
    per_mic = read_star(extracted + "particles.star")["particles"].groupby("rlnMicrographName").size()
    print(f"{extracted}particles.star: {n} particles ({', '.join(f'{Path(m).stem} {c}' for m, c in per_mic.items())})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cryoal_pipeliner_example")
