"""Dead units of rectifier layers: per unit, how many training forward passes it was active in.

A unit is a channel of a convolution's output (dim 1 of N,C,H,W) or a feature of a transformer's or an
MLP's (the last dim of (..., F)). It is dead when it never fires: exactly zero on every input of a window.
The whole-output zero fraction cannot tell a dead layer from a sparse healthy one (each unit active on 10 %
of the inputs is 90 % zeros, all units alive), so for watched ReLU and ReLU6 modules (rectifiers: their
inactive outputs are exact zeros; LeakyReLU, GELU, SiLU never are) the forward hook keeps a float32
counter per unit on the device: `counts += (output.amax(other dims) > 0)`, one reduction per forward
pass, no host read. The window is every training forward pass (grad enabled) since the previous report:
on due steps and between them, so a sparse schedule widens it.

At each report the counters are summarized like any tensor, as an ACTIVATION tensor `<module>:units` of
the module's layer: its count is the units tracked and its zero count the dead units, so the aggregator
reads the dead fraction as zero_count / count with no new wire field (sum / count: the mean number of
forward passes a unit fired in; max: at most the passes in the window). Then they start again from zero.

Bounded memory: at most `max_units` units per module (4 bytes each), the first ones along the unit dim.
A module called on outputs of another width later (a ReLU shared by layers of different widths) is
tracked at the width of its first call; the other calls are skipped.
"""

from __future__ import annotations

import torch

from gradwatch.agent.capture.distributed import local

RECTIFIERS = (torch.nn.ReLU, torch.nn.ReLU6)  # subclasses too
# Autograd nodes that put units on dim 1 (convolutions, channel norms, pooling), or last (matmuls, token
# norms, embeddings); read walking back from a 3-dim output, which can be N,C,L or B,T,F.
_CHANNELS_FIRST = ("Convolution", "BatchNorm", "GroupNorm", "Pool", "Upsample")
_FEATURES_LAST = ("MmBackward", "AddmmBackward", "BmmBackward", "LinearBackward", "LayerNorm", "RmsNorm", "Embedding")
_WALK = 8  # autograd nodes looked at, at most


def is_rectifier(module: torch.nn.Module) -> bool:
    return isinstance(module, RECTIFIERS)


def unit_dim(t: torch.Tensor) -> int:
    """The dim of `t` that holds the units: 1 for N,C,... outputs of four or more dims and for 2-dim
    ones, the last for 1-dim and 3-dim ones, unless the nearest layer-like op behind `t` in the autograd
    graph says otherwise (a 3-dim N,C,L after a Conv1d; B,H,W,F after a Linear)."""
    if t.dim() <= 2:
        return t.dim() - 1
    layout = _producer_layout(t.grad_fn)
    if layout is None:
        return 1 if t.dim() >= 4 else t.dim() - 1
    return 1 if layout else t.dim() - 1


def _producer_layout(node) -> bool | None:
    """True: channels first; False: features last; None: nothing layer-like within _WALK nodes."""
    frontier, seen = [node], 0
    while frontier and seen < _WALK:
        node = frontier.pop(0)
        if node is None:
            continue
        seen += 1
        name = node.name()
        if any(k in name for k in _CHANNELS_FIRST):
            return True
        if any(k in name for k in _FEATURES_LAST):
            return False
        frontier.extend(n for n, _ in node.next_functions)
    return None


class UnitActivity:
    """The per-unit counters of one rectifier module."""

    def __init__(self, max_units: int):
        self.max_units = max_units
        self.counts: torch.Tensor | None = None  # float32 (units,): forward passes each unit fired in
        self.dim = -1
        self.units = 0    # units of the module's output along `dim`, of its first call
        self.forwards = 0  # forward passes counted since the last report (host-side)
        self.skipped = 0   # calls whose output had another number of units

    def observe(self, t: torch.Tensor) -> None:
        """Count, per unit, whether it fired anywhere in `t` (a training forward output). Device work only;
        a DTensor output (tensor parallel) counts its local shard's units, with no collective."""
        t = local(t)
        if t.dim() == 0 or t.numel() == 0:
            return
        if self.counts is None:
            self.dim = unit_dim(t)
            self.units = t.shape[self.dim]
            self.counts = torch.zeros(min(self.units, self.max_units), dtype=torch.float32, device=t.device)
        elif t.dim() <= self.dim or t.shape[self.dim] != self.units:
            self.skipped += 1
            return
        x = t.detach()
        if self.units > self.max_units:
            x = x.narrow(self.dim, 0, self.max_units)
        others = tuple(d for d in range(x.dim()) if d != self.dim)
        # Rectifier outputs are >= 0, so a unit fired iff its largest output is > 0 (NaN: not fired).
        peak = x.amax(dim=others) if others else x
        self.counts.add_(peak > 0)
        self.forwards += 1

    def take(self, summarize, row: int) -> int:
        """At a report: queue the summary of the counters into buffer row `row` (`summarize(row, tensor)`),
        then clear them. Returns the units summarized, 0 when no forward pass was counted (nothing queued)."""
        if not self.forwards or self.counts is None:
            return 0
        summarize(row, self.counts)
        self.counts.zero_()  # queued after the summary's reads: the next window starts
        self.forwards = 0
        return self.counts.numel()
