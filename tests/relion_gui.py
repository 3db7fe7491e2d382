"""Driving RELION's own picker (relion_manualpick -> relion_display --pick) with xdotool under Xvfb.

Used only by the opt-in test: it depends on window timing.  The picker is started exactly as the
GUI's Display button starts it for a coordinates node (RELION 4.0/5.0 gui_mainwindow.cpp,
cb_display_io_node_i): ``relion_manualpick --i <node> --scale .. --sigma_contrast .. --black ..
--white .. [--lowpass ..] [--angpix ..] --particle_diameter ..`` with the values of the project's
``.gui_manualpickjob.star``.  Its list window has a "pick"
button per micrograph (manualpicker.h: x from 340, 60 wide; rows of 35 px below a 25 px menu);
that button starts ``relion_display --pick`` in a window titled with the micrograph name, where a
click at window pixel (x, y) is the micrograph pixel (x/scale, y/scale).
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import starfile

import relion_kit as K

SCALE = 1.0  # 512² crops fit the 1280x1024 screen at scale 1: window pixel = micrograph pixel


@dataclass
class PickerResult:
    expected: list  # the labels the edits must give
    report: str


def xdotool(p: K.RelionProject, *args: str, timeout: float = 30) -> str:
    res = subprocess.run(["xdotool", *args], env=p.env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"xdotool {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout.strip()


def find_window(p: K.RelionProject, name: str, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        res = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", name], env=p.env,
                             capture_output=True, text=True)
        ids = res.stdout.split()
        if ids:
            return ids[-1]
        time.sleep(0.3)
    raise AssertionError(f"no window named {name!r} within {timeout} s")


def click(p: K.RelionProject, win: str, x: float, y: float, button: int = 1) -> None:
    xdotool(p, "mousemove", "--window", win, str(int(round(x * SCALE))), str(int(round(y * SCALE))))
    time.sleep(0.15)
    xdotool(p, "click", str(button))
    time.sleep(0.3)


def key(p: K.RelionProject, win: str, keys: str) -> None:
    xdotool(p, "windowfocus", "--sync", win)
    xdotool(p, "key", keys)
    time.sleep(0.5)


def wait_changed(path: Path, before: bytes, timeout: float = 15) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_bytes() != before:
            return True
        time.sleep(0.2)
    return False


def save_manualpick_settings(p: K.RelionProject, mics: str, pixel: float, diameter: float) -> None:
    """The picker settings Display reads, in ``.gui_manualpickjob.star``: RELION writes that file when a
    Manual picking job is added (here by the pipeliner) or saved with Jobs -> Save job.star."""
    p.add_job("relion.manualpick", {"fn_in": mics, "micscale": f"{SCALE:g}", "sigma_contrast": 3, "black_val": 0,
                                    "white_val": 0, "lowpass": 20, "angpix": f"{pixel:g}", "diameter": f"{diameter:g}"})
    if not (p.root / ".gui_manualpickjob.star").exists():
        raise AssertionError("RELION wrote no .gui_manualpickjob.star")


def display_command(p: K.RelionProject, node: str) -> str:
    """The command the GUI's Display button runs for a coordinates node, built as gui_mainwindow.cpp
    builds it from ``.gui_manualpickjob.star`` (same options, order and conditions in 4.0.2 and 5.0.1)."""
    t = starfile.read(p.root / ".gui_manualpickjob.star", always_dict=True)["joboptions_values"]
    o = {str(k): ("" if pd.isna(v) else str(v)) for k, v in zip(t["rlnJobOptionVariable"], t["rlnJobOptionValue"])}
    cmd = (f"`which relion_manualpick` --i {node} --scale {o['micscale']} --sigma_contrast {o['sigma_contrast']} "
           f"--black {o['black_val']} --white {o['white_val']}")
    if o.get("do_startend") == "Yes":
        cmd += " --pick_start_end "
    for opt, flag in (("lowpass", "--lowpass"), ("highpass", "--highpass"), ("angpix", "--angpix")):
        if float(o.get(opt) or 0) > 0:
            cmd += f" {flag} {o[opt]}"
    cmd += f" --particle_diameter {o['diameter']}"
    if o.get("do_fom_threshold") == "Yes":
        cmd += f" --minimum_pick_fom {o['minimum_pick_fom']}"
    if o.get("do_color") == "Yes":
        cmd += f" --color_label {o['color_label']} --blue {o['blue_value']} --red {o['red_value']}"
    return cmd + " " + o.get("other_args", "")


def review_in_picker(p: K.RelionProject, job: str, pixel: float, diameter: float) -> PickerResult:
    """On the micrograph of ``job``'s queries with most proposals: delete the first proposal (middle
    click), add a pick (left click), CTRL+1 and add a red pick, CTRL+S; then quit the picker (CTRL+Q)."""
    files = list(p.coordinate_list(job + "queries.star").items())  # the list window's rows, in this order
    row = max(range(len(files)), key=lambda i: len(K.read_table(files[i][1])))  # most proposals
    mic, path = files[row]
    before = path.read_bytes()
    table = K.read_table(path)
    radius = diameter / (2 * pixel)
    xs, ys = table["rlnCoordinateX"].astype(float).tolist(), table["rlnCoordinateY"].astype(float).tolist()
    taken = list(zip(xs, ys))
    green = K.free_spot(taken, 512, 2.5 * radius, 1)
    red = K.free_spot(taken + [green], 512, 2.5 * radius, 2)
    save_manualpick_settings(p, p.mics, pixel, diameter)
    cmd = display_command(p, job + "queries.star")
    log = open(p.root / "manualpick_gui.log", "w")
    # its own session: the picker window relion_manualpick starts (system("relion_display ... &"))
    # stays in that process group, so both end together below
    picker = subprocess.Popen(cmd, shell=True, cwd=p.root, env=p.env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    steps = [f"started: {cmd}"]
    try:
        main = find_window(p, "RELION manual-picking")
        steps.append(f"list window {main}")
        click(p, main, 370, 25 + 35 * row + 15)  # that micrograph's "pick" button
        win = find_window(p, mic)
        steps.append(f"picker window {win} ({mic})")
        time.sleep(1.0)
        click(p, win, xs[0], ys[0], button=2)  # middle click: delete the first proposal
        click(p, win, *green, button=1)  # left click: a new (green, type 2) pick
        key(p, win, "ctrl+1")  # CTRL+1: new picks are red (type 1)
        click(p, win, *red, button=1)
        key(p, win, "ctrl+s")
        saved = wait_changed(path, before)
        steps.append(f"CTRL+S saved {path.name}: {saved}")
        key(p, win, "ctrl+q")
    finally:
        K.stop_group(picker)
        log.close()
    after = K.read_table(path)
    steps.append(f"file now has {len(after)} rows (was {len(table)}): "
                 + after.to_string(index=False).replace("\n", " | "))
    steps.append("picker output: " + (p.root / "manualpick_gui.log").read_text(errors="replace").strip()[-800:])
    key_ = Path(mic).stem
    expected = ([(key_, x, y, 1) for x, y in zip(xs[1:], ys[1:])] + [(key_, xs[0], ys[0], 0)]
                + [(key_, float(green[0]), float(green[1]), 1), (key_, float(red[0]), float(red[1]), 0)])
    return PickerResult(expected, "\n".join(steps))
