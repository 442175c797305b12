"""On-demand snapshots: capture what the live view asked for at the next logged step, on the device.

Requests arrive with Export answers (exporter thread) and wait in a bounded queue. At the next logged
step the training thread takes them and, per kind, queues device work and one async copy to host memory:

  WEIGHT_HEATMAP      |W| (as out x rest) average-pooled to at most 64 x 64 cells, right away
  PROJECTION          an embedding table's rows (strided to at most 2,000), or a module's output rows from
                      a forward hook armed for one forward, projected on their first two principal axes
  FEATURE_MAPS        a module's output for the first sample, up to 16 channels pooled to at most 32 x 32,
                      from a forward hook armed for one forward
  CHANNEL_IMPORTANCE  |gradient x activation| of a module's output summed per channel, from a forward hook
                      armed for one training forward and a gradient hook on that output

No host read on the training thread: the exporter thread turns finished copies into Snapshot messages
(`take`). PCA runs as a fixed number of subspace iterations on the device, not torch.pca_lowrank, whose
QR and SVD synchronize with the host on CUDA.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gradwatch.agent.capture.units import unit_dim
from gradwatch.limits import (
    FEATURE_MAP_PIXELS,
    FEATURE_MAPS,
    HEATMAP_CELLS,
    IMPORTANCE_CHANNELS,
    PROJECTION_POINTS,
)
from gradwatch.v1.snapshot_pb2 import Snapshot, SnapshotKind, SnapshotRequest

log = logging.getLogger("gradwatch.agent")

MAX_QUEUED = 16        # requests waiting for a logged step, and snapshots waiting for an export
PCA_ITERATIONS = 60    # subspace iterations: plenty for a picture, fixed so nothing waits on a tolerance
HOOK_TIMEOUT_S = 600.0  # an armed hook whose module never runs again gives up with an error snapshot


@dataclass
class _Pending:
    request: SnapshotRequest
    step: int
    shape: list[int]
    host: torch.Tensor | None = None     # values, copied asynchronously
    event: object | None = None          # CUDA event after the copy; None on the CPU
    maps: int = 1
    labels: list[str] = field(default_factory=list)
    error: str = ""
    capture_time: float = field(default_factory=time.time)


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, object | None]:
    values = values.detach().float().contiguous()
    if values.is_cuda:
        host = torch.empty(values.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return values.clone(), None  # a few KB: independent of whatever training does to the source next


def weight_heatmap(weight: torch.Tensor) -> torch.Tensor:
    """|W| as a matrix (rows: output units, columns: everything else), average-pooled to <= 64 x 64."""
    w = weight.detach()
    m = w.reshape(1, -1) if w.dim() <= 1 else w.reshape(w.shape[0], -1)
    size = (min(m.shape[0], HEATMAP_CELLS), min(m.shape[1], HEATMAP_CELLS))
    return F.adaptive_avg_pool2d(m.abs().float()[None, None], size)[0, 0]


def feature_maps(output: torch.Tensor) -> torch.Tensor:
    """(maps, rows, cols): the first sample's channels (N,C,H,W) or its whole (N,A,B)/(N,F) output."""
    x = output.detach()[0].float()
    if x.dim() >= 3:
        x = x[:FEATURE_MAPS].reshape(min(x.shape[0], FEATURE_MAPS), x.shape[1], -1)
    elif x.dim() == 2:
        x = x[None]
    else:
        x = x.reshape(1, 1, -1)
    size = (min(x.shape[1], FEATURE_MAP_PIXELS), min(x.shape[2], FEATURE_MAP_PIXELS))
    return F.adaptive_avg_pool2d(x[None], size)[0]


def channel_importance(activation: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    """sum over everything but `dim` of |grad x activation|, pooled to <= 4,096 channels."""
    prod = (grad.detach().float() * activation.detach().float()).abs()
    per_channel = prod.movedim(dim, 0).reshape(prod.shape[dim], -1).sum(1)
    if per_channel.numel() > IMPORTANCE_CHANNELS:
        per_channel = F.adaptive_avg_pool1d(per_channel[None, None], IMPORTANCE_CHANNELS)[0, 0]
    return per_channel


def strided_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """At most PROJECTION_POINTS rows of a matrix, evenly strided (a view); and the stride."""
    stride = max(1, math.ceil(x.shape[0] / PROJECTION_POINTS))
    return x[::stride], stride


def pca_2d(x: torch.Tensor, iterations: int = PCA_ITERATIONS) -> torch.Tensor:
    """(n, 2): the rows of `x` (n, d) centered and projected on their first two principal axes, by subspace
    iteration on the smaller of the covariance (d x d) and the Gram matrix (n x n); device ops only."""
    xc = x.detach().float()
    xc = xc - xc.mean(0, keepdim=True)
    gram = xc.shape[0] < xc.shape[1]
    a = xc @ xc.T if gram else xc.T @ xc
    q = torch.randn(a.shape[0], 2, device=a.device)
    for _ in range(iterations):
        z = a @ q
        q1 = z[:, 0] / z[:, 0].norm().clamp_min(1e-30)
        z2 = z[:, 1] - (q1 @ z[:, 1]) * q1
        q = torch.stack([q1, z2 / z2.norm().clamp_min(1e-30)], 1)
    if gram:  # x v = sqrt(lambda) u for the Gram matrix's eigenvectors u
        return q * (q * (a @ q)).sum(0).clamp_min(0).sqrt()
    return xc @ q


def _activation_rows(output: torch.Tensor) -> torch.Tensor:
    """One row per position: (N,C,H,W) -> (N*H*W, C), (..., F) -> (rows, F)."""
    y = output.detach()
    if y.dim() >= 3 and unit_dim(output) == 1:
        y = y.movedim(1, -1)
    return y.reshape(-1, y.shape[-1]) if y.dim() >= 2 else y.reshape(-1, 1)


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


class SnapshotTaker:
    """Requests in (`request`, any thread), captures at logged steps (`on_logged_step`, training thread),
    snapshots out (`take`/`put_back`, exporter thread). Bounded everywhere; the oldest go first."""

    def __init__(self, model: torch.nn.Module, run: str, rank: int, step: Callable[[], int]):
        self.model = model
        self.run = run
        self.rank = rank
        self._step = step
        self._lock = threading.Lock()
        self._requests: deque[SnapshotRequest] = deque(maxlen=MAX_QUEUED)
        self._pending: deque[_Pending] = deque(maxlen=MAX_QUEUED)  # copies queued, or errors
        self._hooks: dict[str, tuple[object, float]] = {}            # request id -> (handle, armed at)
        self.dropped = 0

    # -- any thread ------------------------------------------------------------------------------------

    def request(self, requests) -> None:
        with self._lock:
            for r in requests:
                if r.run_id in ("", self.run):
                    self._requests.append(r)

    @property
    def waiting(self) -> bool:
        with self._lock:
            return bool(self._pending)

    # -- training thread -------------------------------------------------------------------------------

    def on_logged_step(self, step: int) -> None:
        """Start every waiting request: device work and async copies only."""
        with self._lock:
            requests, self._requests = list(self._requests), deque(maxlen=MAX_QUEUED)
        now = time.monotonic()
        for rid, (handle, armed) in list(self._hooks.items()):
            if now - armed > HOOK_TIMEOUT_S:
                handle.remove()
                del self._hooks[rid]
        for r in requests:
            try:
                self._start(r, step)
            except Exception as err:  # noqa: BLE001 - a snapshot that cannot be taken says why, training goes on
                self._add(_Pending(r, step, [], error=f"cannot capture: {type(err).__name__}: {err}"[:500]))

    def _start(self, r: SnapshotRequest, step: int) -> None:
        kind = r.kind
        param = dict(self.model.named_parameters()).get(r.tensor)
        module = dict(self.model.named_modules()).get(r.tensor) if param is None else None
        if param is None and module is None:
            self._add(_Pending(r, step, [], error=f"no module or parameter named {r.tensor!r} in this model"))
            return
        if kind == SnapshotKind.SNAPSHOT_KIND_WEIGHT_HEATMAP or (
                kind == SnapshotKind.SNAPSHOT_KIND_PROJECTION
                and (param is not None or isinstance(module, torch.nn.Embedding))):
            weight = param if param is not None else getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                self._add(_Pending(r, step, [], error=f"{r.tensor!r} has no weight"))
                return
            if kind == SnapshotKind.SNAPSHOT_KIND_WEIGHT_HEATMAP:
                self._copy(_Pending(r, step, list(weight.shape)), weight_heatmap(weight))
            else:
                rows = weight.detach().reshape(weight.shape[0], -1) if weight.dim() >= 2 else weight.reshape(-1, 1)
                sampled, stride = strided_rows(rows)
                labels = [str(i) for i in range(0, rows.shape[0], stride)]
                self._copy(_Pending(r, step, list(weight.shape), labels=labels), pca_2d(sampled))
            return
        if module is None:
            self._add(_Pending(r, step, [], error=f"{r.tensor!r} is a parameter; this snapshot needs a module"))
            return
        if kind in (SnapshotKind.SNAPSHOT_KIND_FEATURE_MAPS, SnapshotKind.SNAPSHOT_KIND_CHANNEL_IMPORTANCE,
                    SnapshotKind.SNAPSHOT_KIND_PROJECTION):
            self._arm(module, r)
            return
        self._add(_Pending(r, step, [], error=f"unknown snapshot kind {kind}"))

    def _arm(self, module: torch.nn.Module, r: SnapshotRequest) -> None:
        """A forward hook for the module's next (training, for importance) forward; it removes itself."""

        def hook(mod, args, output) -> None:
            try:
                y = _first_tensor(output)
                if y is None:
                    self._disarm(r.id)
                    self._add(_Pending(r, self._step(), [], error=f"{r.tensor!r} returned no tensor"))
                    return
                if r.kind == SnapshotKind.SNAPSHOT_KIND_CHANNEL_IMPORTANCE:
                    if not y.requires_grad:
                        return  # an evaluation forward: wait for a training one
                    self._disarm(r.id)
                    pending, dim = _Pending(r, self._step(), list(y.shape)), unit_dim(y)
                    y.register_hook(lambda grad: self._guarded_copy(pending, lambda: channel_importance(y, grad, dim)))
                    return
                self._disarm(r.id)
                pending = _Pending(r, self._step(), list(y.shape))
                if r.kind == SnapshotKind.SNAPSHOT_KIND_FEATURE_MAPS:
                    maps = feature_maps(y)
                    pending.maps = maps.shape[0]
                    self._copy(pending, maps)
                else:
                    sampled, _ = strided_rows(_activation_rows(y))
                    self._copy(pending, pca_2d(sampled))
            except Exception as err:  # noqa: BLE001 - never raise into the user's forward
                self._disarm(r.id)
                self._add(_Pending(r, self._step(), [], error=f"cannot capture: {type(err).__name__}: {err}"[:500]))

        self._hooks[r.id] = (module.register_forward_hook(hook), time.monotonic())

    def _guarded_copy(self, pending: _Pending, values: Callable[[], torch.Tensor]) -> None:
        try:  # runs inside autograd: never raise into the user's backward
            self._copy(pending, values())
        except Exception as err:  # noqa: BLE001
            pending.error = f"cannot capture: {type(err).__name__}: {err}"[:500]
            self._add(pending)

    def _disarm(self, request_id: str) -> None:
        entry = self._hooks.pop(request_id, None)
        if entry is not None:
            entry[0].remove()

    def _copy(self, pending: _Pending, values: torch.Tensor) -> None:
        if values.dim() == 1:
            values = values[None]
        pending.host, pending.event = _to_host(values)
        self._add(pending)

    def _add(self, pending: _Pending) -> None:
        with self._lock:
            if len(self._pending) == self._pending.maxlen:
                self.dropped += 1
            self._pending.append(pending)

    def close(self) -> None:
        for handle, _ in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    # -- exporter thread -------------------------------------------------------------------------------

    def take(self) -> list[Snapshot]:
        """The snapshots whose copies have landed, as messages; the others wait for a later call."""
        with self._lock:
            ready = [p for p in self._pending if p.event is None or p.event.query()]
            self._pending = deque((p for p in self._pending if not any(p is q for q in ready)), maxlen=MAX_QUEUED)
        return [self._message(p) for p in ready]

    def put_back(self, snapshots: list[Snapshot]) -> None:
        """Snapshots of an export that failed: offered again with the next one, while they fit."""
        with self._lock:
            room = self._pending.maxlen - len(self._pending)
            self.dropped += max(0, len(snapshots) - room)
            self._pending.extendleft(_Encoded(s) for s in reversed(snapshots[:room]))

    def _message(self, p: _Pending) -> Snapshot:
        if isinstance(p, _Encoded):
            return p.snapshot
        r = p.request
        snap = Snapshot(request_id=r.id, run_id=self.run, rank=self.rank, step=p.step, kind=r.kind, tensor=r.tensor,
                        shape=p.shape, error=p.error)
        snap.capture_time.FromNanoseconds(int(p.capture_time * 1e9))
        if p.host is not None and not p.error:
            values = p.host  # (maps, rows, cols) or (rows, cols)
            snap.maps = p.maps
            snap.rows, snap.cols = values.shape[-2], values.shape[-1]
            snap.values.extend(values.reshape(-1).tolist())  # sync: exporter thread, after the copy's event
            snap.labels.extend(p.labels)
        return snap


@dataclass
class _Encoded:
    """A finished snapshot put back after a failed export."""

    snapshot: Snapshot
    event: object | None = None
