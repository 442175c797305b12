"""Numerical gradient checking: the analytic gradient of a model's loss against central differences.

    report = gradwatch.agent.gradcheck.gradcheck(model, loss_fn, batch)   # loss_fn(model, batch) -> scalar
    print(report.table()); assert report.passed

Every check runs on a float64 copy of the model (`deepcopy().double()`, gradwatch's own hooks left
out), so the user's model, its gradients, its buffers and the global RNG are left as they were. For
each parameter tensor a seeded sample of coordinates is perturbed by +-eps; the numerical derivative
(J(theta + eps) - J(theta - eps)) / 2 eps is compared with the analytic one by the relative error
|a - n| / max(|a|, |n|, tiny). `tiny` keeps coordinates whose gradient is zero up to rounding from
dividing noise by noise: in float64 the central difference carries about 1e-16 |J| / eps of rounding.

With a watcher, the result also travels through the pipeline as an evaluation report of user scalars:
`gradcheck/passed` (1 or 0), `gradcheck/max_relative_error` and `gradcheck/<tensor>` per tensor.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gradwatch.limits import EXPORTED_SCALARS
from gradwatch.names import EVAL, GRADCHECK_MAX_RELATIVE_ERROR, GRADCHECK_PASSED, GRADCHECK_SUMMARY, gradcheck_scalar

DEFAULT_EPS = 1e-6
DEFAULT_SAMPLES = 10        # coordinates per parameter tensor
DEFAULT_TOLERANCE = 1e-5    # the largest relative error that passes (a correct float64 model: ~1e-7)
DEFAULT_TINY = 1e-3         # floor of the relative error's denominator, times max(|J|, 1)
DEFAULT_SEED = 0
# Per-tensor scalars sent, the worst first: with the verdict and the worst error, all the aggregator exports.
MAX_TENSOR_SCALARS = EXPORTED_SCALARS - len(GRADCHECK_SUMMARY)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@dataclass(frozen=True)
class TensorCheck:
    """One parameter tensor: the worst of its sampled coordinates."""

    name: str
    shape: tuple[int, ...]
    checked: int                    # coordinates compared
    max_relative_error: float
    max_abs_error: float
    worst_index: tuple[int, ...]    # the coordinate of max_relative_error
    analytic: float                 # both derivatives there
    numeric: float
    passed: bool


@dataclass
class GradcheckReport:
    tensors: list[TensorCheck] = field(default_factory=list)
    loss: float = math.nan
    eps: float = DEFAULT_EPS
    tolerance: float = DEFAULT_TOLERANCE
    samples: int = DEFAULT_SAMPLES

    @property
    def passed(self) -> bool:
        return bool(self.tensors) and all(t.passed for t in self.tensors)

    @property
    def failed(self) -> list[str]:
        """Names of the tensors above the tolerance, in model order."""
        return [t.name for t in self.tensors if not t.passed]

    @property
    def max_relative_error(self) -> float:
        return max((t.max_relative_error for t in self.tensors), default=math.nan)

    def scalars(self) -> dict[str, float]:
        """The user scalars sent as telemetry: verdict, worst error, and each tensor's (worst first)."""
        out = {GRADCHECK_PASSED: 1.0 if self.passed else 0.0,
               GRADCHECK_MAX_RELATIVE_ERROR: self.max_relative_error}
        worst = sorted(self.tensors, key=lambda t: -t.max_relative_error)[:MAX_TENSOR_SCALARS]
        out.update({gradcheck_scalar(t.name): t.max_relative_error for t in worst})
        return out

    def table(self) -> str:
        verdict = "passed" if self.passed else (
            f"FAILED: {len(self.failed)} of {len(self.tensors)} tensors above {self.tolerance:g}"
            if self.tensors else "FAILED: no parameter tensor to check")
        head = (f"gradcheck {verdict} (float64, eps {self.eps:g}, up to {self.samples} coordinates per tensor, "
                f"loss {self.loss:.6g})")
        rows = [("tensor", "shape", "checked", "max rel error", "max abs error", "worst at", "analytic", "numeric",
                 "")]
        for t in self.tensors:
            rows.append((t.name, "x".join(map(str, t.shape)) or "()", str(t.checked), f"{t.max_relative_error:.2e}",
                         f"{t.max_abs_error:.2e}", str(list(t.worst_index)), f"{t.analytic:.6g}", f"{t.numeric:.6g}",
                         "" if t.passed else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        return "\n".join([head, *lines])


def _strip_gradwatch_hooks(model) -> None:
    """A deepcopy keeps the module hooks: gradwatch's would summarize the copy's passes into the watcher."""
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if not isinstance(hooks, dict):
                continue
            for key in [k for k, fn in hooks.items() if _is_gradwatch(fn)]:
                del hooks[key]


def _is_gradwatch(fn) -> bool:
    fn = getattr(fn, "__func__", fn)
    return (getattr(fn, "__module__", None) or "").startswith("gradwatch.agent")


def to_float64(batch: object) -> object:
    """The batch with every floating-point tensor as a float64 copy (integers, e.g. labels, as they are)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.detach().to(torch.float64) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: to_float64(v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_float64(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_float64(v) for v in batch)
    return batch


def _loss_of(loss_fn: Callable, model, batch) -> Callable[[], object]:
    """loss_fn(model, batch); a criterion module (nn.CrossEntropyLoss()) with a batch (inputs, targets)
    is called as loss_fn(model(inputs), targets)."""
    from torch import nn

    if isinstance(loss_fn, nn.modules.loss._Loss):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("a loss module needs a batch (inputs, targets); otherwise pass loss_fn(model, batch)")
        inputs, targets = batch
        return lambda: loss_fn(model(inputs), targets)
    return lambda: loss_fn(model, batch)


def _scalar(loss) -> object:
    import torch

    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"the loss must be a one-element tensor, got {type(loss).__name__}"
                         + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    return loss.reshape(())


def _coordinates(numel: int, k: int, generator) -> list[int]:
    import torch

    if k >= numel:
        return list(range(numel))
    if numel <= 1 << 22:
        picked = torch.randperm(numel, generator=generator)[:k]
    else:  # no permutation of a huge embedding: draw, drop repeats
        picked = torch.randint(numel, (2 * k,), generator=generator).unique()[:k]
    return sorted(picked.tolist())  # sync: gradcheck is a debugging run on a model copy, not a training step


def gradcheck(model, loss_fn: Callable, batch: object, *, eps: float = DEFAULT_EPS, samples: int = DEFAULT_SAMPLES,
              tolerance: float = DEFAULT_TOLERANCE, tiny: float = DEFAULT_TINY, seed: int = DEFAULT_SEED,
              train: bool = False, names: Callable[[str], bool] | None = None, watcher=None) -> GradcheckReport:
    """Compare the analytic gradient of `loss_fn` with central differences on `samples` seeded coordinates
    of every parameter tensor (that requires grad, and that `names` accepts), in float64.

    loss_fn(model, batch) returns the scalar loss; a loss module (nn.MSELoss()) with a batch (inputs,
    targets) works too. The model copy is in eval mode unless `train` (then dropout draws the same
    masks for every evaluation: each runs from `seed`). A tensor passes when none of its coordinates
    has a relative error above `tolerance`; the relative error's denominator is at least
    tiny x max(|J|, 1). With `watcher`, the result is sent as an evaluation report of scalars
    (gradcheck/passed, gradcheck/max_relative_error, gradcheck/<tensor>).
    """
    import numpy as np
    import torch

    if not eps > 0 or not tolerance > 0 or samples < 1:
        raise ValueError("eps and tolerance must be > 0 and samples >= 1")
    twin = copy.deepcopy(model)
    _strip_gradwatch_hooks(twin)
    twin.double()
    twin.train(train)
    data = to_float64(batch)
    forward = _loss_of(loss_fn, twin, data)

    def evaluate(grad: bool):
        with torch.random.fork_rng(devices=[]) if train else contextlib.nullcontext(), torch.set_grad_enabled(grad):
            if train:
                torch.manual_seed(seed)
            return _scalar(forward())

    params = [(n, p) for n, p in twin.named_parameters() if p.requires_grad and p.is_floating_point()
              and (names is None or names(n))]
    for _, p in params:
        p.grad = None
    loss = evaluate(True)
    loss.backward()
    j = loss.item()  # sync: gradcheck's own host reads (finite differences on a float64 copy, no training step)
    floor = tiny * max(abs(j), 1.0)
    report = GradcheckReport(loss=j, eps=eps, tolerance=tolerance, samples=samples)
    generator = torch.Generator().manual_seed(seed)
    for name, p in params:
        analytic = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).cpu()  # sync: as above
        flat = p.data.view(-1) if p.data.is_contiguous() else None
        worst = (-1.0, 0.0, 0, 0.0, 0.0)  # (relative, absolute, index, analytic, numeric)
        max_abs = 0.0
        coords = _coordinates(p.numel(), samples, generator)
        for i in coords:
            at = tuple(int(x) for x in np.unravel_index(i, tuple(p.shape))) if flat is None else None
            with torch.no_grad():
                original = (flat[i] if flat is not None else p.data[at]).item()  # sync: as above
                up, down = original + eps, original - eps
                _set(p, flat, i, at, up)
                plus = evaluate(False).item()  # sync: as above
                _set(p, flat, i, at, down)
                minus = evaluate(False).item()  # sync: as above
                _set(p, flat, i, at, original)
            numeric = (plus - minus) / (up - down)  # the step actually taken, after rounding
            a = analytic[i].item()  # sync: as above
            err = abs(a - numeric)
            rel = err / max(abs(a), abs(numeric), floor)
            if not math.isfinite(rel):
                rel = math.inf
            max_abs = max(max_abs, err) if math.isfinite(err) else math.inf
            if rel > worst[0]:
                worst = (rel, err, i, a, numeric)
        rel, _, index, a, numeric = worst
        report.tensors.append(TensorCheck(
            name=name, shape=tuple(p.shape), checked=len(coords), max_relative_error=max(rel, 0.0),
            max_abs_error=max_abs, worst_index=tuple(int(x) for x in np.unravel_index(index, tuple(p.shape))),
            analytic=a, numeric=numeric, passed=rel <= tolerance))
    if watcher is not None:
        watcher.step(phase=EVAL, **report.scalars())
    return report


def _set(p, flat, i: int, at, value: float) -> None:
    if flat is not None:
        flat[i] = value
    else:
        p.data[at] = value


def load_spec(spec: str):
    """`package.module:function` or `path/to/file.py:function`; the function returns (model, loss_fn, batch)."""
    import importlib
    import importlib.util
    import os

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if where.endswith(".py") or os.sep in where:
        if not os.path.exists(where):
            raise ValueError(f"no such file: {where}")
        name = "_gradcheck_" + os.path.splitext(os.path.basename(where))[0]
        module_spec = importlib.util.spec_from_file_location(name, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{where} has no function {attr!r}")
    made = fn()
    if not (isinstance(made, (tuple, list)) and len(made) == 3):
        raise ValueError(f"{spec} must return (model, loss_fn, batch)")
    return made
