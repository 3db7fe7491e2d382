"""Streaming prediction: micrographs in, picks out, with reading and NMS overlapped with the network.

Why a separate engine: prediction over thousands of micrographs must not store feature maps
(128 x H x W each) and must keep the CPU/GPU busy.  The BLR is linear in the backbone's
features, so it is folded into the backbone as a 1x1 convolution head (``PickingNet``): one
forward pass gives the logit map directly, the features never leave the network.

Three stages run concurrently, joined by small bounded queues (memory stays flat however many
micrographs there are):

* reader threads (``readers``; one on the CPU, several on a GPU, where one cannot keep up): read
  MRC, Fourier-crop, normalise (``io.load_micrograph``), ``prefetch`` ahead, handed on in order;
* a compute thread: batches micrographs of equal working shape, runs ``PickingNet`` (optionally
  under autocast float16/bfloat16: ``precision``);
* the caller's thread: NMS (``extract.extract_picks``) and whatever it does with each result
  (write files), while the next micrograph is on the network.

On CUDA (issue 15, part 2) the Fourier crop runs with torch.fft on the GPU (``gpu_crop``), the
views of a ``+viewsK`` model are stacked into few forward passes (``view_batch``), and the logit
maps stay on the GPU for the NMS (``device_nms``: max-pool peaks, the exact greedy walk only on
what they leave).  Each is selectable and CPU-tested to give the CPU path's picks.

Results come back in input order.  A micrograph that cannot be read is reported (``error``) and
skipped; anything else stops the stream with the error.
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from .extract import Picks, extract_picks
from .features import DEFAULT_FEATURE_MODEL
from .io import Micrograph, MicrographError, load_micrograph
from .model import BLR

_END = object()


@dataclass
class PredictSettings:
    """How to run the network; none of these change the picks (``precision`` aside: check the AP)."""

    feature_model: str = DEFAULT_FEATURE_MODEL
    working_pixel_size: float = 8.0
    device: str | None = None  # None: cuda when present, else cpu
    batch_size: int = 1  # micrographs per forward pass (consecutive ones of equal working shape)
    half: bool = False  # shorthand for precision="fp16"
    precision: str | None = None  # backbone under autocast: fp32 (None), fp16 (CUDA only), bf16
    prefetch: int = 2  # micrographs read ahead / logit maps waiting for NMS
    readers: int | None = None  # threads reading + normalising (None: 1 on CPU, up to 4 on CUDA)
    channels_last: bool | None = None  # NHWC activations (None: on CUDA, off on the CPU; H100: 1.3x)
    threshold: float | None = None  # keep picks with probability >= this
    min_score: float = 1e-4  # drop the hopeless tail (as extract_picks)
    normalisation: str | None = None  # io.normalise method (None: $CRYOAL_NORMALISATION or 'gmm', the histogram fit)
    gpu_normalise: bool = True  # on CUDA, with normalisation 'gmm-sample': Topaz's fit on the GPU (H100: 1.7x end to end)
    # issue 15, part 2 (None: on CUDA, off on the CPU, whose outputs stay as they were):
    gpu_crop: bool | None = None  # Fourier crop with torch.fft on the device (crop_torch; ~1e-6 of the std from numpy's)
    device_nms: bool | None = None  # NMS on the device (nms_torch: exactly extract.nms's picks)
    view_batch: int | None = None  # +viewsK: the views stacked into passes of <= N images (None: 8 on CUDA; 0: one by one)
    views: int | None = None  # views averaged at prediction (None: the feature model's own; cryoal predict: prediction_views)


@dataclass
class Item:
    """What one micrograph needs on its way through the stream."""

    index: int
    key: object  # the caller's handle (a MicrographSpec, a path, ...)
    path: str
    name: str
    pixel_size: float | None
    seconds: dict = field(default_factory=dict)  # time per stage: read, crop, normalise, network, nms


@dataclass
class Result:
    """One micrograph's outcome, in input order."""

    key: object
    name: str
    picks: Picks | None  # None when the micrograph could not be read
    shape: tuple[int, int] | None = None  # original (ny, nx)
    working_shape: tuple[int, int] | None = None
    error: str | None = None
    seconds: dict = field(default_factory=dict)  # time per stage (they overlap across micrographs)


def settings_precision(s: "PredictSettings") -> str:
    """The precision a PredictSettings asks for ('fp32', 'fp16', 'bf16'); ``half`` means fp16."""
    p = s.precision or ("fp16" if s.half else "fp32")
    if s.half and p not in ("fp16", "half", "float16"):
        raise ValueError(f"half=True conflicts with precision={s.precision!r}")
    return p


# `cryoal predict`'s default views for a model trained on N-view features, per device kind (None: the
# model's own N).  benchmarks/view_count.py (benchmarks/README.md, "View count at prediction"): a
# +views8 model predicting with 4 views stayed within 0.005 mean AP of 8 views on EMPIAR-10028, -10017
# and the bundled crops at 25 and 100 labels (5 seeds), for half the network time; 2 and 1 view lost
# up to 0.019 and 0.051.  A GPU runs 8 views at 15 micrographs/s, so it keeps the model's own.
PREDICT_VIEWS: dict[str, int | None] = {"cuda": None, "cpu": 4}


def prediction_views(feature_model: str, device: str, views: int | None = None) -> int:
    """The view count to predict with: ``views`` when given, else the device's default, never above
    the count the model was trained on (more views than its features saw is a choice, not a default)."""
    from .features import VIEWS, parse_feature_model

    trained = parse_feature_model(feature_model)[1]
    if views is not None:
        if int(views) not in VIEWS:
            raise ValueError(f"--views {views}: choose one of {', '.join(map(str, VIEWS))}")
        return int(views)
    default = PREDICT_VIEWS["cuda" if str(device).startswith("cuda") else "cpu"]
    return trained if default is None else min(trained, default)


def default_readers(device: str) -> int:
    """Reader threads: the GMM normalisation is ~0.1-0.3 s of CPU per 1024^2 micrograph, so one
    reader cannot feed a GPU; on the CPU one reader leaves the cores to the network."""
    if not device.startswith("cuda"):
        return 1
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use cpu)")
    return str(device)


def _head_weights(model: BLR | None, feature_model: str) -> tuple[np.ndarray, float]:
    """(w, b) of the linear head: the BLR's raw-space weights, or Topaz's own head."""
    from .features import head_of

    if model is None:
        return head_of(feature_model)
    if model.coef_ is None:
        raise ValueError("the BLR model is not fitted")
    return np.asarray(model.coef_, dtype=np.float64), float(model.intercept_)


_NET_CLASS = None


def _net_class():
    """``PickingNet`` (defined on first use, so importing this module does not import torch)."""
    global _NET_CLASS
    if _NET_CLASS is None:
        import torch

        from .features import autocast, view_mean, view_mean_batched

        class PickingNet(torch.nn.Module):
            """backbone -> 1x1 head; the backbone under autocast when ``dtype`` is set, the head in float32."""

            def __init__(self, backbone, head, device: str, dtype=None, channels_last: bool = False, views: int = 1,
                         view_batch: int = 0):
                super().__init__()
                self.backbone, self.head = backbone, head
                self.device, self.dtype, self.channels_last, self.views = device, dtype, channels_last, views
                self.view_batch = view_batch  # 0: view by view; N: the views stacked, <= N images per pass

            def forward(self, x):
                # the head is linear: the mean of its logits over the views is the head of the mean features
                if self.view_batch and self.views > 1:
                    return view_mean_batched(self.one_view, x, self.views, self.view_batch)
                return view_mean(self.one_view, x, self.views)

            def one_view(self, x):
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(self.device, self.dtype):  # thread-local: entered in the calling thread
                    z = self.backbone(x)
                return self.head(z.float() if self.dtype is not None else z)

        _NET_CLASS = PickingNet
    return _NET_CLASS


def picking_net(model: BLR | None, feature_model: str = DEFAULT_FEATURE_MODEL, device: str = "cpu", half: bool = False,
                precision: str | None = None, channels_last: bool = False, view_batch: int = 0,
                views: int | None = None):
    """Topaz backbone (dense mode) with the BLR as its 1x1 head: image (N,1,H,W) -> logits (N,1,H,W) float32.

    ``views``: views averaged (default: those of ``feature_model``, the features the model was
    trained on; fewer are cheaper, see ``prediction_views``).

    ``precision`` 'fp16' (CUDA only) or 'bf16' runs the backbone under autocast; ``half`` is
    shorthand for 'fp16'.  ``view_batch`` N > 0 stacks the views of a ``+viewsK`` model into
    passes of at most N images (``features.view_mean_batched``); 0 runs them one by one.  A
    private copy of the backbone, so the shared one (features.load_pretrained) is never changed
    by the head or the memory format.
    """
    import torch

    from .features import load_pretrained, parse_feature_model, resolve_precision

    if half and precision not in (None, "fp16", "half", "float16"):
        raise ValueError(f"half=True conflicts with precision={precision!r}")
    dtype = resolve_precision(precision or ("fp16" if half else "fp32"), device)
    base = load_pretrained(feature_model, "cpu")
    w, b = _head_weights(model, feature_model)
    channels = base.classifier.in_channels
    if w.shape[0] != channels:
        raise ValueError(f"model has {w.shape[0]} weights but {feature_model} gives {channels} features; "
                         "was it trained with another --feature-model?")
    head = torch.nn.Conv2d(channels, 1, kernel_size=1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w.astype(np.float32)).view(1, channels, 1, 1))
        head.bias.fill_(float(b))
    views = parse_feature_model(feature_model)[1] if views is None else prediction_views(feature_model, device, views)
    net = _net_class()(copy.deepcopy(base.features), head, device, dtype, channels_last, views,
                       max(0, int(view_batch or 0))).eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Blocking put that gives up when the stream is being shut down."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    """Blocking get that gives up (returns _END) when the stream is being shut down."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _END


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def stream_predict(
    inputs: Iterable[tuple[object, str, str, float | None]],
    model: BLR | None,
    radius_of: Callable[[object, Micrograph], float],
    settings: PredictSettings | None = None,
) -> Iterator[Result]:
    """Picks for each micrograph of ``inputs`` = (key, path, name, pixel_size), in order.

    ``radius_of(key, micrograph)`` gives the particle radius in that micrograph's file pixels.
    The generator can be abandoned at any point; its threads stop within ~0.1 s.
    """
    import torch

    s = settings or PredictSettings()
    device = resolve_device(s.device)
    on_cuda = device.startswith("cuda")
    precision = settings_precision(s)
    # H100, 1024^2, resnet16_u32: NHWC gave 1.3x for fp16/bf16 and TF32 float32 (cuDNN's default), but
    # 0.88x with TF32 turned off (benchmarks/README.md, GPU): on by default on CUDA
    channels_last = s.channels_last if s.channels_last is not None else on_cuda
    gpu_crop = s.gpu_crop if s.gpu_crop is not None else on_cuda
    device_nms = s.device_nms if s.device_nms is not None else on_cuda
    view_batch = s.view_batch if s.view_batch is not None else (8 if on_cuda else 0)
    net = picking_net(model, s.feature_model, device, precision=precision, channels_last=channels_last,
                      view_batch=view_batch, views=s.views)
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # one working shape repeats: let cuDNN pick its fastest kernels
    items = [Item(i, k, str(p), n, ps) for i, (k, p, n, ps) in enumerate(inputs)]
    depth = max(1, int(s.prefetch))
    n_readers = max(1, int(s.readers or default_readers(device)))
    loaded: queue.Queue = queue.Queue(maxsize=depth + max(1, s.batch_size))
    scored: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read_one(it: Item):
        try:
            return it, load_micrograph(it.path, s.working_pixel_size, it.pixel_size, name=it.name,
                                       device=device if on_cuda and s.gpu_normalise else None,
                                       normalisation=s.normalisation, timings=it.seconds,
                                       crop_device=device if gpu_crop else None)
        except MicrographError as exc:
            return it, exc

    def one_thread() -> None:
        # The GMM normalisation runs small torch ops: with the default thread count a reader's
        # OpenMP team and the network's fight over the cores (measured on 2 cores: the stream
        # took 1.8x the bare network time); one thread per reader leaves the cores to the network.
        torch.set_num_threads(1)

    def reader() -> None:
        one_thread()
        pool = None
        try:
            if n_readers == 1:
                for it in items:
                    if stop.is_set() or not _put(loaded, read_one(it), stop):
                        return
            else:  # a pool reads ahead; results are handed on in input order
                pool = concurrent.futures.ThreadPoolExecutor(n_readers, "cryoal-read-pool", initializer=one_thread)
                ahead: collections.deque = collections.deque()
                todo = iter(items)
                for it in todo:
                    ahead.append(pool.submit(read_one, it))
                    if len(ahead) >= n_readers + depth:
                        break
                while ahead:
                    payload = ahead.popleft().result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        ahead.append(pool.submit(read_one, nxt))
                    if stop.is_set() or not _put(loaded, payload, stop):
                        return
            _put(loaded, _END, stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            _put(loaded, _Failure(exc), stop)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def forward(batch: list[tuple[Item, Micrograph]]) -> list:
        x = np.stack([m.image for _, m in batch])[:, None]
        with torch.inference_mode():
            t = torch.from_numpy(x).to(device)
            z = net(t)[:, 0].float()
            if not device_nms:
                z = z.cpu().numpy()
            elif on_cuda:
                torch.cuda.synchronize(device)  # the network time is the network's, as when the maps came back
        return [z[i] for i in range(len(batch))]  # device_nms: tensors on the device, for extract_picks

    def compute() -> None:
        # torch initialises a thread's OpenMP team lazily, from the process-wide count at its first
        # parallel op: set ours and force that first use now, before the reader lowers the count.
        torch.set_num_threads(n_threads)
        torch.get_num_threads()
        compute_ready.set()
        try:
            pending = None
            done = False
            while not done and not stop.is_set():
                batch: list[tuple[Item, Micrograph]] = []
                while len(batch) < max(1, s.batch_size):
                    nxt = pending if pending is not None else _get(loaded, stop)
                    pending = None
                    if nxt is _END:
                        done = True
                        break
                    if isinstance(nxt, _Failure):
                        _put(scored, nxt, stop)
                        return
                    it, mic = nxt
                    if isinstance(mic, MicrographError):
                        if batch:  # keep the order: flush what is batched first
                            pending = nxt
                            break
                        if not _put(scored, (it, None, mic), stop):
                            return
                        continue
                    if batch and mic.image.shape != batch[0][1].image.shape:
                        pending = nxt  # a batch holds one working shape
                        break
                    batch.append((it, mic))
                if batch:
                    t0 = time.perf_counter()
                    zs = forward(batch)
                    share = (time.perf_counter() - t0) / len(batch)
                    for (it, mic), z in zip(batch, zs):
                        it.seconds["network"] = share
                        mic.image = None  # the logits are all that is needed from here
                        if not _put(scored, (it, mic, z), stop):
                            return
            if done:
                _put(scored, _END, stop)
        except BaseException as exc:  # noqa: BLE001
            _put(scored, _Failure(exc), stop)

    n_threads = torch.get_num_threads()
    compute_ready = threading.Event()
    threads = [threading.Thread(target=compute, name="cryoal-compute", daemon=True),
               threading.Thread(target=reader, name="cryoal-read", daemon=True)]
    threads[0].start()
    compute_ready.wait(timeout=10)
    threads[1].start()
    try:
        while True:
            got = scored.get()
            if got is _END:
                break
            if isinstance(got, _Failure):
                raise got.exc
            it, mic, z = got
            if mic is None:
                yield Result(it.key, it.name, None, error=str(z), seconds=dict(it.seconds))
                continue
            r = radius_of(it.key, mic)
            t0 = time.perf_counter()
            picks = extract_picks(it.name, z, mic.frame, r, s.threshold, s.min_score)
            it.seconds["nms"] = time.perf_counter() - t0
            yield Result(it.key, it.name, picks, tuple(mic.frame.original_shape), tuple(mic.frame.working_shape),
                         seconds=dict(it.seconds))
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=5)
        torch.set_num_threads(n_threads)  # undo the reader's setting for threads started later


def backbone_seconds(images: list[np.ndarray], model: BLR | None = None, feature_model: str = DEFAULT_FEATURE_MODEL,
                     device: str | None = None, half: bool = False, batch_size: int = 1,
                     precision: str | None = None, channels_last: bool | None = None, net=None,
                     view_batch: int = 0) -> float:
    """Bare network time over in-memory working-scale images (the benchmark's reference).

    Host -> device copy, forward pass and the logits back to the host, ``batch_size`` images of
    equal shape per pass; no reading, normalising or NMS.  ``net``: a ready ``picking_net``.
    """
    import torch

    device = resolve_device(device)
    precision = precision or ("fp16" if half else "fp32")
    if channels_last is None:
        channels_last = device.startswith("cuda")
    if net is None:
        net = picking_net(model, feature_model, device, precision=precision, channels_last=channels_last,
                          view_batch=view_batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), max(1, batch_size)):
            x = np.stack([np.ascontiguousarray(im, dtype=np.float32) for im in images[i : i + max(1, batch_size)]])
            net(torch.from_numpy(x[:, None]).to(device))[:, 0].float().cpu().numpy()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t
