"""Input batches and labels: statistics of what the model is fed, and a class histogram of the labels.

`Watcher.observe_inputs(batch, labels)` calls `observe()` on the training thread, once per batch.

Inputs, on due steps only: every tensor of the batch (a tensor, or a dict / tuple / list of them,
nested) is summarized into the shared device buffer as `inputs.<key>`; floating-point tensors also per
channel, `inputs.<key>[c]` (dim 1: NCHW images, NCL signals, and the features of a 2-D batch), when
there are at most `max_channels`. Module path `(inputs)`, kind INPUT. Input summaries also carry the
sum of cubes (skewness); the batches of one step (micro-batches of gradient accumulation) merge into one
summary.

Labels, on every call: integer class labels are counted into a fixed-size device histogram with
`index_add_` (no host read: `bincount` would read the largest label back to size its output). Labels at
or above `max_classes` count as overflow, negative ones (ignore_index, e.g. -100) not at all. The
watcher copies the histogram out and clears it at each captured step, so each report carries the class
counts of every batch observed since the previous report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping

import torch

from gradwatch.agent.capture.slots import TensorSlot
from gradwatch.agent.stats.layout import NCOLS
from gradwatch.agent.stats.summarize import Summarizer
from gradwatch.names import INPUTS_MODULE, LABELS_OVERFLOW, channel_name, input_name, label_scalar
from gradwatch.v1 import run_pb2

MAX_INPUT_TENSORS = 32  # tensors of one batch that are watched; the rest of a huge batch dict is left out

log = logging.getLogger("gradwatch.agent")


def flatten(batch: object, prefix: str = "", out: list | None = None) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a batch: a bare tensor is "0", dict keys and sequence positions join with
    dots ("0.input_ids"); anything else is skipped."""
    out = [] if out is None else out
    if isinstance(batch, torch.Tensor):
        out.append((prefix or "0", batch))
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(batch, (tuple, list)):
        for i, value in enumerate(batch):
            flatten(value, f"{prefix}.{i}" if prefix else str(i), out)
    return out


def channels_of(t: torch.Tensor, max_channels: int) -> int:
    """How many per-channel summaries a tensor gets: its dim-1 size for floating-point tensors of 2 or
    more dims, when at most max_channels; else 0 (whole-tensor statistics only)."""
    if not t.is_floating_point() or t.dim() < 2:
        return 0
    c = t.shape[1]
    return c if c <= max_channels else 0


class InputObserver:
    def __init__(self, summarizer: Summarizer, add_slots: Callable[[list[TensorSlot]], list[TensorSlot]],
                 max_channels: int, max_classes: int):
        self._summarizer = summarizer
        self._add_slots = add_slots  # gives new slots their ids and grows the buffers
        self.max_channels = max_channels
        self.max_classes = max_classes
        self._slots: dict[str, tuple[TensorSlot, list[TensorSlot]]] = {}  # key -> (whole, channels)
        self.present: dict[int, TensorSlot] = {}  # this step's input rows, with their element counts
        # Class counts since the last capture: classes 0..max_classes-1, then overflow, in float64 rows.
        self.label_rows = 0
        self.label_counts: torch.Tensor | None = None
        self._warned_labels = False

    def observe(self, batch: object, labels: object, due: bool) -> None:
        if due:
            for key, tensor in flatten(batch)[:MAX_INPUT_TENSORS]:
                self._summarize(key, tensor.detach())
        if labels is not None:
            self._count(labels)

    def _summarize(self, key: str, t: torch.Tensor) -> None:
        if t.is_sparse or t.is_complex() or t.numel() == 0:
            return
        entry = self._slots.get(key)
        if entry is None:
            entry = self._slots[key] = self._register(key, t)
        whole, channels = entry
        accumulate = whole.id in self.present  # another batch of the same step: merge
        if channels and channels_of(t, self.max_channels) == len(channels):
            self._summarizer.summarize_channels(whole.id, channels[0].id, t, accumulate, cubes=True)
            per_channel = t.numel() // len(channels)
            for slot in channels:
                self._mark(slot, per_channel, t, accumulate)
        else:  # integers (token ids), masks, and floating-point tensors without channels
            self._summarizer.summarize(whole.id, t, accumulate, cubes=True)
        self._mark(whole, t.numel(), t, accumulate)

    def _mark(self, slot: TensorSlot, numel: int, t: torch.Tensor, accumulate: bool) -> None:
        before = self.present[slot.id].numel if accumulate and slot.id in self.present else 0
        self.present[slot.id] = dataclasses.replace(slot, numel=before + numel, shape=tuple(t.shape))

    def _register(self, key: str, t: torch.Tensor) -> tuple[TensorSlot, list[TensorSlot]]:
        dtype = str(t.dtype).removeprefix("torch.")
        shape = tuple(t.shape)

        def slot(name: str) -> TensorSlot:
            return TensorSlot(id=-1, name=name, kind=run_pb2.TENSOR_KIND_INPUT, module_path=INPUTS_MODULE, order=0,
                              shape=shape, dtype=dtype, numel=0, partition=run_pb2.PARTITION_PER_RANK)

        name = input_name(key)
        slots = self._add_slots([slot(name)] + [slot(channel_name(name, c))
                                                for c in range(channels_of(t, self.max_channels))])
        return slots[0], slots[1:]

    def _count(self, labels: object) -> None:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            if not self._warned_labels:
                self._warned_labels = True
                log.warning("gradwatch: labels must be an integer tensor of class indices; not counting %s",
                            type(labels).__name__ if not isinstance(labels, torch.Tensor) else labels.dtype)
            return
        if self.label_counts is None:
            self.label_rows = math.ceil((self.max_classes + 1) / NCOLS)
            # The watcher's host copies grow by label_rows from the next capture on.
            self.label_counts = torch.zeros(self.label_rows, NCOLS, dtype=torch.float64,
                                            device=self._summarizer.device)
        y = labels.detach().reshape(-1).to(self.label_counts.device, non_blocking=True).long()
        weight = (y >= 0).to(torch.float64)  # ignore_index and other negatives weigh nothing
        self.label_counts.view(-1).index_add_(0, y.clamp(0, self.max_classes), weight)

    def take_present(self) -> list[TensorSlot]:
        slots = list(self.present.values())
        self.present.clear()
        return slots


def label_scalars(counts, max_classes: int, highest_seen: int) -> tuple[dict[str, float], int]:
    """Reader thread: the `labels/<class>` scalars of one report from its host copy of the counts, every
    class from 0 to the highest seen so far in the run (absent classes as 0), and `labels_overflow`
    when labels at or above max_classes were seen. Returns them and the new highest class seen."""
    counts = counts[: max_classes + 1]
    if not counts.any():
        return {}, highest_seen
    seen = counts[:max_classes].nonzero()[0]
    if seen.size:
        highest_seen = max(highest_seen, int(seen[-1]))
    scalars = {label_scalar(c): float(counts[c]) for c in range(highest_seen + 1)}
    if counts[max_classes]:
        scalars[LABELS_OVERFLOW] = float(counts[max_classes])
    return scalars, highest_seen
