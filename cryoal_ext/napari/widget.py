"""The napari dock widget: a thin Qt shell over ``LabellingController``.

Layers (world coordinates = pixels of the micrograph file, x = column, y = row):
``micrograph`` (the engine's Fourier-cropped image, scaled up; optional low-pass for display),
``picks`` (green: the model's picks above the threshold), ``labels`` (blue positive, red
negative; editable: add mode adds a missed particle, deleting a point removes its label) and
``proposals`` (yellow; the current one larger).  Keys: G accept (good), B reject (bad), N skip.
Features, retraining and prediction run in a worker thread (``napari.qt.threading``), with
progress in the widget; the viewer stays responsive.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout,
                            QLabel, QLineEdit, QProgressBar, QPushButton, QSlider, QSpinBox, QVBoxLayout, QWidget)

from .controller import LabellingController

BLUE = np.array([0.15, 0.45, 1.0, 1.0])
RED = np.array([1.0, 0.15, 0.15, 1.0])
YELLOW = np.array([1.0, 0.9, 0.0, 1.0])
GREEN = np.array([0.2, 0.95, 0.3, 1.0])
KEYS = {"accept": "g", "reject": "b", "skip": "n"}


def _button(text: str, slot, tip: str = "") -> QPushButton:
    b = QPushButton(text)
    b.clicked.connect(lambda *_: slot())
    if tip:
        b.setToolTip(tip)
    return b


class LabellingWidget(QWidget):
    """Open micrographs, label proposals, retrain, predict, export: the active-learning loop in napari."""

    def __init__(self, napari_viewer, controller: LabellingController | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.ctl = controller or LabellingController()
        self.current_name: str | None = None
        self.last_error: str | None = None
        self._worker = None
        self._what = ""
        self._syncing = False
        self.image_layer = self.picks_layer = self.labels_layer = self.proposals_layer = None
        self._build()
        for action, key in KEYS.items():
            self.viewer.bind_key(key, self._key(action), overwrite=True)
        self._refresh_status()

    # --- layout ---------------------------------------------------------------------------------
    def _build(self) -> None:
        s = self.ctl.settings
        root = QVBoxLayout(self)

        box = QGroupBox("Micrographs")
        form = QFormLayout(box)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("MRC file, folder, RELION micrographs .star or cryoSPARC exposures .cs")
        row = QHBoxLayout()
        row.addWidget(self.path_edit)
        row.addWidget(_button("Files…", self._browse_files))
        row.addWidget(_button("Folder…", self._browse_folder))
        form.addRow("source", row)
        self.project_edit = QLineEdit()
        self.project_edit.setPlaceholderText("project folder for .star/.cs paths (default: found)")
        form.addRow("project", self.project_edit)
        self.pixel_spin = QDoubleSpinBox(decimals=3, maximum=100.0)
        self.pixel_spin.setSpecialValueText("from files")
        self.pixel_spin.setToolTip("pixel size override (A); 0 = from the MRC header / STAR / .cs")
        form.addRow("pixel size (Å)", self.pixel_spin)
        self.radius_spin = QDoubleSpinBox(decimals=1, maximum=5000.0)
        self.radius_spin.setValue(s.radius_px or 0.0)
        self.radius_spin.setSpecialValueText("use diameter")
        form.addRow("radius (px)", self.radius_spin)
        self.diameter_spin = QDoubleSpinBox(decimals=1, maximum=10000.0)
        self.diameter_spin.setValue(s.diameter_A or 0.0)
        self.diameter_spin.setSpecialValueText("use radius")
        form.addRow("diameter (Å)", self.diameter_spin)
        form.addRow(_button("Open", self.open_source, "read the source and show its first micrograph"))
        nav = QHBoxLayout()
        self.mic_combo = QComboBox()
        self.mic_combo.activated.connect(lambda i: self.show_micrograph(self.mic_combo.itemText(i)))
        nav.addWidget(_button("◀", lambda: self._step(-1)))
        nav.addWidget(self.mic_combo, 1)
        nav.addWidget(_button("▶", lambda: self._step(1)))
        form.addRow("micrograph", nav)
        self.lowpass_spin = QDoubleSpinBox(decimals=0, maximum=500.0, singleStep=5.0)
        self.lowpass_spin.setSpecialValueText("off")
        self.lowpass_spin.setToolTip("display only: Gaussian low-pass to this resolution (A)")
        self.lowpass_spin.valueChanged.connect(lambda *_: self._draw_image())
        form.addRow("low-pass (Å)", self.lowpass_spin)
        root.addWidget(box)

        box = QGroupBox("Label")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.batch_spin = QSpinBox(minimum=1, maximum=500, value=self.ctl.batch)
        row.addWidget(QLabel("batch"))
        row.addWidget(self.batch_spin)
        # -1 shows as "auto": the recipe's own number of audits (3 of 10 for the default)
        self.audits_spin = QSpinBox(minimum=-1, maximum=499, value=-1 if self.ctl.audits is None else self.ctl.audits)
        self.audits_spin.setSpecialValueText("auto")
        self.audits_spin.setToolTip("checks: from 50 answers on, this many of each batch are the model's own picks, "
                                    "to accept or reject as any other; they calibrate the probabilities and the "
                                    "expected count (auto: the recipe's, 3 for default; 0: none; 6 was measured no better)")
        row.addWidget(QLabel("checks"))
        row.addWidget(self.audits_spin)
        self.retrain_button = _button("Retrain → proposals", self.retrain,
                                      "fit the model on every label, then show the most uncertain spots")
        row.addWidget(self.retrain_button, 1)
        lay.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(_button("Accept (G)", self.accept, "the current proposal is a particle"))
        row.addWidget(_button("Reject (B)", self.reject, "the current proposal is not a particle"))
        row.addWidget(_button("Skip (N)", self.skip, "leave it unlabelled"))
        lay.addLayout(row)
        row = QHBoxLayout()
        self.add_check = QCheckBox("click adds a particle")
        self.add_check.setToolTip("labels layer in add mode: each click adds a positive label (a missed particle)")
        self.add_check.toggled.connect(self._set_add_mode)
        row.addWidget(self.add_check)
        row.addWidget(_button("Remove selected label", self.remove_selected,
                              "select label points (labels layer, select mode) and remove them"))
        lay.addLayout(row)
        self.proposal_label = QLabel()
        self.proposal_label.setWordWrap(True)
        lay.addWidget(self.proposal_label)
        root.addWidget(box)

        box = QGroupBox("Picks")
        lay = QVBoxLayout(box)
        lay.addWidget(_button("Predict all micrographs", self.predict, "pick every micrograph with the current model"))
        row = QHBoxLayout()
        self.threshold_slider = QSlider(Qt.Horizontal)
        self.threshold_slider.setRange(0, 1000)
        self.threshold_slider.setValue(int(round(self.ctl.threshold * 1000)))
        self.threshold_slider.valueChanged.connect(self._threshold_changed)
        row.addWidget(QLabel("threshold"))
        row.addWidget(self.threshold_slider, 1)
        self.threshold_label = QLabel()
        row.addWidget(self.threshold_label)
        lay.addLayout(row)
        self.count_label = QLabel()
        lay.addWidget(self.count_label)
        root.addWidget(box)

        box = QGroupBox("Files")
        grid = QVBoxLayout(box)
        row = QHBoxLayout()
        row.addWidget(_button("Save model…", self.save_model))
        row.addWidget(_button("Load model…", self.load_model))
        row.addWidget(_button("Session folder…", self.set_session, "keep labels, model and rounds in a folder"))
        grid.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(_button("Export picks…", self.export_picks, ".star (RELION), .cs (cryoSPARC), .txt (Topaz)"))
        row.addWidget(_button("Export labels…", self.export_labels, ".star, .cs, .txt or .tsv"))
        grid.addLayout(row)
        row = QHBoxLayout()
        self.import_combo = QComboBox()
        self.import_combo.addItems(["as in file (else positive)", "as positives", "as negatives"])
        row.addWidget(_button("Import picks as labels…", self.import_labels))
        row.addWidget(self.import_combo)
        grid.addLayout(row)
        root.addWidget(box)

        row = QHBoxLayout()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        row.addWidget(self.progress, 1)
        self.stop_button = _button("Stop", self.stop)
        self.stop_button.setEnabled(False)
        row.addWidget(self.stop_button)
        root.addLayout(row)
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        root.addWidget(self.status_label)
        root.addStretch(1)
        self._busy_widgets = [self.retrain_button, self.mic_combo]

    # --- worker plumbing ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _run(self, gen_func, on_done, what: str) -> None:
        """Run a generator yielding (done, total, name) in a worker thread; ``on_done(result)`` in the GUI thread."""
        from napari.qt.threading import create_worker

        if self.busy:
            self._say(f"busy ({self._what}); wait or press Stop")
            return
        self.last_error = None
        self._what = what
        worker = create_worker(gen_func, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(on_done)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.progress.setRange(0, 0)  # busy until the first yield tells the total
        self.stop_button.setEnabled(True)
        for w in self._busy_widgets:
            w.setEnabled(False)
        self._say(f"{what}…")
        worker.start()

    def _on_progress(self, value) -> None:
        done, total, name = value
        self.progress.setRange(0, max(int(total), 1))
        self.progress.setValue(int(done))
        self._say(f"{self._what}: {done}/{total} {name}")

    def _on_error(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._say(f"{self._what} failed: {exc}")
        try:
            from napari.utils.notifications import show_error

            show_error(f"cryoal: {self._what} failed: {exc}")
        except Exception:  # noqa: BLE001 - a notification must never take the widget down
            pass

    def _on_finished(self) -> None:
        self._worker = None
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.stop_button.setEnabled(False)
        for w in self._busy_widgets:
            w.setEnabled(True)

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self._say(f"stopping {self._what} after the current micrograph…")

    def _say(self, text: str) -> None:
        self.status_label.setText(text)

    def _fail(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._say(str(exc))
        try:
            from napari.utils.notifications import show_error

            show_error(f"cryoal: {exc}")
        except Exception:  # noqa: BLE001
            pass

    # --- opening and showing --------------------------------------------------------------------
    def _browse_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Micrographs, micrographs STAR or exposures .cs", "",
                                                "Micrographs (*.mrc *.mrcs *.star *.cs);;All files (*)")
        if files:
            self.path_edit.setText(os.pathsep.join(files))

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of micrographs")
        if folder:
            self.path_edit.setText(folder)

    def _apply_size(self) -> None:
        r, d = self.radius_spin.value(), self.diameter_spin.value()
        if r or d:
            self.ctl.set_particle_size(radius_px=r or None, diameter_A=None if r else d)

    def open_source(self, source=None, project_dir=None) -> list[str]:
        """Open micrographs (``source``: a path, several paths, or the path box) and show the first."""
        if source is None:
            text = self.path_edit.text().strip()
            if not text:
                self._say("give a micrograph, a folder, a micrographs .star or an exposures .cs")
                return []
            source = text.split(os.pathsep) if os.pathsep in text else text
        else:
            self.path_edit.setText(os.pathsep.join(map(str, source)) if isinstance(source, (list, tuple))
                                   else str(source))
        project_dir = project_dir or self.project_edit.text().strip() or None
        try:
            self._apply_size()
            names = self.ctl.open(source, project_dir=project_dir, pixel_size=self.pixel_spin.value() or None)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._fail(exc)
            return []
        self.mic_combo.clear()
        self.mic_combo.addItems(names)
        self.current_name = None
        note = ("; " + "; ".join(self.ctl.notes)) if self.ctl.notes else ""
        self._say(f"{len(names)} micrograph(s) from {self.ctl.source}{note}")
        if names:
            self.show_micrograph(names[0])
        return names

    def _step(self, delta: int) -> None:
        n = self.mic_combo.count()
        if n:
            self.show_micrograph(self.mic_combo.itemText((self.mic_combo.currentIndex() + delta) % n))

    def show_micrograph(self, name: str, center=None) -> None:
        """Featurise ``name`` if needed (worker thread; it joins the training set), then draw it."""
        if name not in self.ctl.specs:
            self._say(f"unknown micrograph {name}")
            return

        def job():
            yield from self.ctl.load_features([name])
            return name

        def done(_):
            self._display(name, center)

        if name in self.ctl.items:
            self._display(name, center)
        else:
            self._run(job, done, f"features of {name}")

    def _display(self, name: str, center=None) -> None:
        first = self.image_layer is None or self.current_name is None
        changed = name != self.current_name
        self.current_name = name
        i = self.mic_combo.findText(name)
        if i >= 0:
            self.mic_combo.setCurrentIndex(i)
        self._draw_image()
        self._ensure_point_layers()
        self.refresh()
        if first or changed:
            self.viewer.reset_view()
        if center is not None:
            self._camera().center = tuple(center)

    def _camera(self):
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        return scene.camera if scene is not None and hasattr(scene, "camera") else self.viewer.camera

    def _draw_image(self) -> None:
        name = self.current_name
        if name is None or name not in self.ctl.items:
            return
        img = self.ctl.image(name, self.lowpass_spin.value())
        lo, hi = (float(v) for v in np.percentile(img, [0.5, 99.5]))
        scale = self.ctl.scale(name)
        if self.image_layer is None or self.image_layer not in self.viewer.layers:
            self.image_layer = self.viewer.add_image(img, name="micrograph", scale=scale, colormap="gray",
                                                     contrast_limits=(lo, hi))
        else:
            self.image_layer.data = img
            self.image_layer.scale = scale
            self.image_layer.contrast_limits = (lo, hi)

    def _ensure_point_layers(self) -> None:
        empty = np.empty((0, 2))
        common = dict(face_color="transparent", border_width_is_relative=True)
        if self.picks_layer is None or self.picks_layer not in self.viewer.layers:
            self.picks_layer = self.viewer.add_points(empty, name="picks", border_color=[GREEN], border_width=0.06,
                                                      **common)
        if self.labels_layer is None or self.labels_layer not in self.viewer.layers:
            self.labels_layer = self.viewer.add_points(empty, name="labels (blue +, red −)", border_width=0.15,
                                                       features={"label": np.empty(0, int)}, **common)
            self.labels_layer.feature_defaults = {"label": 1}
            self.labels_layer.current_border_color = BLUE
            self.labels_layer.events.data.connect(self._on_labels_edited)
        if self.proposals_layer is None or self.proposals_layer not in self.viewer.layers:
            self.proposals_layer = self.viewer.add_points(empty, name="proposals (yellow)", border_color=[YELLOW],
                                                          border_width=0.1, **common)
        if self.image_layer is not None:
            self.viewer.layers.selection.active = self.labels_layer if self.add_check.isChecked() else self.image_layer

    # --- drawing --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Redraw picks, labels and proposals of the shown micrograph, and the status texts."""
        if self.current_name is not None and self.labels_layer is not None:
            self._draw_picks()
            self._draw_labels()
            self._draw_proposals()
        self._refresh_status()

    def _diameter(self) -> float:
        try:
            return 2.0 * self.ctl.radius_of(self.current_name)
        except (ValueError, KeyError):
            return 20.0

    def _set_points(self, layer, yx: np.ndarray, size, colors: np.ndarray, width=None, features=None) -> None:
        self._syncing = True
        try:
            layer.selected_data = set()
            layer.data = yx if len(yx) else np.empty((0, 2))
            if features is not None:
                layer.features = features
            if len(yx):
                layer.size = size
                layer.border_color = colors
                if width is not None:
                    layer.border_width = width
        finally:
            self._syncing = False

    def _draw_picks(self) -> None:
        pk = self.ctl.picks_above(self.current_name)
        d = self._diameter()
        yx = np.c_[pk.y, pk.x] if pk is not None and len(pk) else np.empty((0, 2))
        self._set_points(self.picks_layer, yx, d, np.tile(GREEN, (len(yx), 1)))

    def _draw_labels(self) -> None:
        labs = self.ctl.labels_on(self.current_name)
        yx = np.array([[l.y, l.x] for l in labs]).reshape(-1, 2)
        lab = np.array([l.label for l in labs], int)
        colors = np.where(lab[:, None] == 1, BLUE, RED) if len(lab) else np.empty((0, 4))
        self._set_points(self.labels_layer, yx, 0.8 * self._diameter(), colors, features={"label": lab})
        self.labels_layer.feature_defaults = {"label": 1}
        self.labels_layer.current_border_color = BLUE

    def _draw_proposals(self) -> None:
        props = self.ctl.pending(self.current_name)
        cur = self.ctl.current
        yx = np.array([[p.y, p.x] for p in props]).reshape(-1, 2)
        is_cur = np.array([p is cur for p in props], bool)
        d = self._diameter()
        self._set_points(self.proposals_layer, yx, np.where(is_cur, 1.3 * d, 1.1 * d), np.tile(YELLOW, (len(yx), 1)),
                         width=np.where(is_cur, 0.2, 0.08))

    def _refresh_status(self) -> None:
        pos, neg = self.ctl.counts()
        cur = self.ctl.current
        left = len(self.ctl.pending())
        if cur is None:
            text = (f"no proposal pending: press Retrain ({left} skipped)" if self.ctl.proposals
                    else "press Retrain for proposals")
        else:
            text = (f"proposal {self.ctl.current_index + 1}/{len(self.ctl.proposals)} on {cur.micrograph} at "
                    f"({cur.x:.0f}, {cur.y:.0f}), p = {cur.score:.2f}: G accept, B reject, N skip")
        r = self.ctl.last_round
        fit = (f"; round {r.round}: fit {r.fit_s:.2f} s, proposals {r.propose_s:.2f} s\n{r.note}" if r else "")
        self.proposal_label.setText(f"{text}\nlabels: {pos} positive, {neg} negative{fit}")
        self._refresh_count()

    def _refresh_count(self) -> None:
        t = self.ctl.threshold
        self.threshold_label.setText(f"{t:.3f}")
        here = self.ctl.picks_above(self.current_name) if self.current_name else None
        n_mic = len(self.ctl.picks)
        self.count_label.setText(f"{self.ctl.count()} picks on {n_mic} micrograph(s)"
                                 + (f"; {len(here)} on this one" if here is not None else "")
                                 + (f"; particles expected: {self.ctl.expected_count().text}" if n_mic else ""))

    def _threshold_changed(self, value: int) -> None:
        self.ctl.threshold = value / 1000.0
        if self.picks_layer is not None and self.current_name is not None:
            self._draw_picks()
        self._refresh_count()

    def set_threshold(self, t: float) -> None:
        self.threshold_slider.setValue(int(round(t * 1000)))

    # --- labelling ------------------------------------------------------------------------------
    def _key(self, action: str):
        def handler(viewer):
            getattr(self, action)()

        handler.__name__ = f"cryoal_{action}"
        return handler

    def _answer(self, fn) -> None:
        if self.busy:
            return
        fn()
        self._go_to_current()

    def accept(self) -> None:
        self._answer(self.ctl.accept)

    def reject(self) -> None:
        self._answer(self.ctl.reject)

    def skip(self) -> None:
        self._answer(self.ctl.skip)

    def _go_to_current(self) -> None:
        cur = self.ctl.current
        if cur is not None and cur.micrograph != self.current_name:
            self.show_micrograph(cur.micrograph, center=(cur.y, cur.x))
            return
        self.refresh()
        if cur is not None:
            self._camera().center = (cur.y, cur.x)

    def _set_add_mode(self, on: bool) -> None:
        if self.labels_layer is None:
            return
        self.viewer.layers.selection.active = self.labels_layer
        self.labels_layer.mode = "add" if on else "pan_zoom"

    def _on_labels_edited(self, event) -> None:
        if self._syncing or self.current_name is None:
            return
        if str(getattr(event, "action", "changed")) not in ("added", "removed", "changed"):
            return
        layer = self.labels_layer
        yx = np.asarray(layer.data, float).reshape(-1, 2)
        lab = np.asarray(layer.features["label"], float) if "label" in layer.features else np.ones(len(yx))
        lab = np.where(np.isfinite(lab), lab, 1).astype(int)
        self.ctl.sync_labels(self.current_name, yx[:, 1], yx[:, 0], lab)
        QTimer.singleShot(0, self.refresh)  # recolour after napari has finished its own update

    def add_label(self, x: float, y: float, label: int = 1) -> None:
        """A label at (x, y) on the shown micrograph (what a click in add mode does)."""
        self.ctl.add_label(self.current_name, x, y, label)
        self.refresh()

    def remove_selected(self) -> None:
        layer = self.labels_layer
        if layer is None or not layer.selected_data:
            self._say("select label points first (labels layer, select mode), then Remove")
            return
        for i in sorted(layer.selected_data):
            y, x = layer.data[i]
            self.ctl.remove_label(self.current_name, x, y, within_px=0.5)
        self.refresh()

    def retrain(self) -> None:
        """Fit on every label and show new proposals (worker thread)."""
        self.ctl.batch = self.batch_spin.value()
        self.ctl.audits = None if self.audits_spin.value() < 0 else self.audits_spin.value()
        try:
            self.ctl.engine_recipe()
            self._apply_size()
        except ValueError as exc:
            self._fail(ValueError(str(exc).replace("--audits", "checks")))
            return

        def job():
            yield from self.ctl.load_features(self.ctl.training_names())
            return self.ctl.retrain()

        def done(info):
            how = "refitted" if info.fitted else "pretrained score"
            self._say(f"round {info.round}: {how} on {info.n_labels} labels in {info.fit_s:.2f} s; "
                      f"{info.n_proposals} proposals in {info.propose_s:.2f} s")
            self._go_to_current()

        self._run(job, done, "retrain")

    def predict(self, names=None) -> None:
        """Pick every micrograph (or ``names``) with the current model (worker thread)."""
        try:
            self._apply_size()
        except ValueError as exc:
            self._fail(exc)
            return

        def done(_):
            self.set_threshold(self.ctl.threshold)
            self._say(f"picked {len(self.ctl.picks)} micrograph(s); suggested threshold {self.ctl.threshold:.3f}")
            self.refresh()

        def job():
            yield from self.ctl.predict(names)

        self._run(job, done, "predict")

    # --- files ----------------------------------------------------------------------------------
    def _save_path(self, title: str, filt: str) -> str | None:
        path, _ = QFileDialog.getSaveFileName(self, title, "", filt)
        return path or None

    def _open_path(self, title: str, filt: str) -> str | None:
        path, _ = QFileDialog.getOpenFileName(self, title, "", filt)
        return path or None

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._fail(exc)
            return None

    def save_model(self, path=None):
        path = path or self._save_path("Save model", "Model (*.npz)")
        if path:
            out = self._guard(self.ctl.save_model, path)
            if out:
                self._say(f"model -> {out} (+ .json)")
            return out

    def load_model(self, path=None):
        path = path or self._open_path("Load model", "Model (*.npz)")
        if path:
            model = self._guard(self.ctl.load_model, path)
            if model is not None:
                self._say(f"model {path} loaded: Retrain for proposals from it, or Predict")
                self.refresh()
            return model

    def set_session(self, folder=None) -> None:
        folder = folder or QFileDialog.getExistingDirectory(self, "Session folder (labels, model, rounds)")
        if folder:
            self._guard(self.ctl.set_session, folder)
            self._say(f"session {folder}: round {self.ctl.round}, {len(self.ctl.labels)} labels")
            self.refresh()

    def export_picks(self, path=None):
        path = path or self._save_path("Export picks", "RELION (*.star);;cryoSPARC (*.cs);;Topaz (*.txt)")
        if path:
            out = self._guard(self.ctl.export_picks, path)
            if out:
                self._say(f"{self.ctl.count()} picks (threshold {self.ctl.threshold:.3f}) -> "
                          + ", ".join(map(str, out)))
            return out

    def export_labels(self, path=None):
        path = path or self._save_path("Export labels", "RELION (*.star);;cryoSPARC (*.cs);;Topaz (*.txt);;TSV (*.tsv)")
        if path:
            out = self._guard(self.ctl.export_labels, path)
            if out:
                self._say(f"{len(self.ctl.labels)} labels -> " + ", ".join(map(str, out)))
            return out

    def import_labels(self, path=None, label: int | None = -1):
        """Existing picks as labels; ``label`` 1/0 forces one, None keeps the file's; -1: as the combo box says."""
        path = path or self._open_path("Import picks as labels", "Picks (*.star *.cs *.txt *.tsv);;All files (*)")
        if not path:
            return None
        if label == -1:
            label = {0: None, 1: 1, 2: 0}[self.import_combo.currentIndex()]
        res = self._guard(self.ctl.import_labels, path, label)
        if res:
            added, unmatched = res
            extra = f" ({unmatched} on micrographs not open)" if unmatched else ""
            self._say(f"{added} labels from {Path(path).name}{extra}")
            self.refresh()
        return res
