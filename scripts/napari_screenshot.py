"""Screenshot of the napari plugin on real data, for the README (docs/napari.png).

Opens the EMPIAR-10028 micrographs of the shared test data in napari with the plugin's widget,
runs two labelling rounds in which a simulated user answers every proposal from the expert picks
(``particles.txt``; a real user presses G / B), retrains, predicts every micrograph, and saves
the whole window (``viewer.screenshot(canvas_only=False)``).

    python scripts/napari_screenshot.py [--data ../shared/data/empiar10028] [--out docs/napari.png]

Needs the extra (``pip install -e '.[napari]'``).  Without a DISPLAY it re-runs itself under
``xvfb-run`` (Debian: ``apt-get install xvfb``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("CRYOAL_TEST_DATA", REPO.parent / "shared" / "data")) / "empiar10028"
    p.add_argument("--data", default=str(default), help="folder with micrographs/ and particles.txt")
    p.add_argument("--out", default=str(REPO / "docs" / "napari.png"))
    p.add_argument("--radius-px", type=float, default=28.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", default="1800x1080", help="window size WxH")
    args = p.parse_args()

    if not os.environ.get("DISPLAY"):
        if not shutil.which("xvfb-run"):
            print("no DISPLAY and no xvfb-run (apt-get install xvfb)", file=sys.stderr)
            return 1
        os.execvp("xvfb-run", ["xvfb-run", "-a", "-s", "-screen 0 2400x1600x24", sys.executable, *sys.argv])
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")

    import numpy as np
    import pandas as pd
    import napari
    from qtpy.QtWidgets import QApplication

    from cryoal_ext.commands.common import default_cache
    from cryoal_ext.napari.controller import LabellingController
    from cryoal_ext.napari.widget import LabellingWidget
    from cryoal_ext.oracle import Oracle
    from cryoal_ext.workflow import EngineSettings

    data = Path(args.data)
    t = pd.read_csv(data / "particles.txt", sep="\t", dtype={"image_name": str})
    truth = {n: (g["x_coord"].to_numpy(float), g["y_coord"].to_numpy(float)) for n, g in t.groupby("image_name")}
    oracle = Oracle(truth, args.radius_px, mode="careful")

    viewer = napari.Viewer(title="cryoal_ext: active-learning picking")
    width, height = (int(v) for v in args.size.split("x"))
    viewer.window._qt_window.resize(width, height)
    widget = LabellingWidget(viewer, LabellingController(EngineSettings(cache_dir=default_cache())))
    viewer.window.add_dock_widget(widget, name="cryoal", area="right")
    app = QApplication.instance()

    def wait():
        while widget.busy:
            app.processEvents()
            time.sleep(0.02)
        for _ in range(20):
            app.processEvents()
        if widget.last_error:
            raise RuntimeError(widget.last_error)

    widget.radius_spin.setValue(args.radius_px)
    widget.lowpass_spin.setValue(40.0)
    names = widget.open_source(str(data / "micrographs"))
    wait()
    widget._step(1)  # a second training micrograph
    wait()
    widget._step(-1)
    wait()
    for r in range(args.rounds):
        widget.retrain()
        wait()
        while widget.ctl.current is not None:
            if oracle.answer([widget.ctl.current])[0].label:
                widget.accept()
            else:
                widget.reject()
            wait()
    widget.retrain()  # the next round's proposals stay on screen, unanswered
    wait()
    widget.predict()
    wait()
    widget.show_micrograph(widget.ctl.current.micrograph if widget.ctl.current else names[0])
    wait()
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
    img = viewer.screenshot(canvas_only=False, flash=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import imageio.v3 as iio

    iio.imwrite(out, np.asarray(img))
    pos, neg = widget.ctl.counts()
    print(f"{out}: {img.shape[1]}x{img.shape[0]}; {pos} positive, {neg} negative labels, "
          f"{widget.ctl.count()} picks at threshold {widget.ctl.threshold:.3f} on {len(names)} micrographs")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
