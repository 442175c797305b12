"""Agent configuration: defaults as named constants, environment overrides, validation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

from gradwatch import endpoints, limits
from gradwatch.settings import (
    FILE,
    ConfigError,
    Settings,
    choice,
    host_port,
    integer,
    number,
    setting,
    spec,
)

DEFAULT_COLLECTOR = endpoints.COLLECTOR
DEFAULT_EVERY = 1                  # log every N-th optimizer step
DEFAULT_HISTOGRAM = True           # log2-magnitude histograms (64 fixed buckets) for every tensor
DEFAULT_ACTIVATIONS = False        # statistics of every leaf module's output (forward hooks) on logged steps
DEFAULT_SCHEDULE = ""              # a schedule spec (agent/capture/schedule.py); "" means every:<every>
DEFAULT_BURST_STEPS = 50           # after a local NaN/Inf, capture every step for this many steps (0: off)
DEFAULT_SELECT = ""                # a selection spec (agent/capture/select.py), e.g. "preset:business,exclude:*.bias"
DEFAULT_HOST_SLOTS = 8             # host buffers in flight (pinned on CUDA, 576 B a row); none free: step skipped
DEFAULT_QUEUE_SIZE = 2048          # reports waiting for export; when full the oldest is dropped, counted
DEFAULT_QUEUE_BYTES = 64 << 20     # encoded bytes of reports held (waiting + in flight); over it the oldest go
DEFAULT_BATCH_REPORTS = 64         # reports per Export call at most
DEFAULT_BATCH_BYTES = limits.BATCH_BYTES  # encoded bytes per Export call at most (2 MiB: half a message)
DEFAULT_EXPORT_INTERVAL_S = 0.5    # export at least this often while reports wait
DEFAULT_EXPORT_TIMEOUT_S = 10.0    # one deadline for an Export call and all of its retries
# close() returns within this (flush, then stop; an export in flight is cancelled): a job whose collector is
# gone must still exit promptly, and at a 0.5 s export interval little is waiting to go by then.
DEFAULT_SHUTDOWN_TIMEOUT_S = 1.0
DEFAULT_CHUNK_ELEMENTS = 1 << 22   # tensors are summarized in chunks so temporaries stay bounded
DEFAULT_TLS = False                # plaintext unless asked; the collector decides whether it serves TLS
DEFAULT_UPDATES_MAX_BYTES = 256 << 20  # device memory for the parameter copy that updates need, on captured steps
DEFAULT_INPUTS_MAX_CHANNELS = 64   # observe_inputs: per-channel statistics for tensors with at most this many
DEFAULT_LABELS_MAX_CLASSES = 1000  # observe_inputs: classes counted one by one; higher labels count as overflow
DEFAULT_KERNELS = "auto"           # fused statistics kernels (agent/stats/kernels.py): auto | sync | torch
DEFAULT_UNITS_MAX = 65536          # units (channels, features) per watched ReLU whose activity is counted (0: off)
DEFAULT_ORIGIN = True              # check every leaf module's output and output gradient for NaN/Inf, every step
DEFAULT_FLUSH_NONFINITE = True     # export a report with a NaN/Inf origin or loss at once, not at the next interval


def _schedule_parser():
    from gradwatch.agent.capture.schedule import parse

    return parse


def _select_parser():
    from gradwatch.agent.capture.select import Selection

    return Selection.parse


@dataclass
class AgentConfig(Settings):
    """Everything the agent needs; `from_env()` applies the GRADWATCH_AGENT_* variables (core/settings.py)."""

    COMPONENT: ClassVar[str] = "agent"

    collector: str = setting(DEFAULT_COLLECTOR, "collector address agents export to", flag="watch(collector=)",
                             form=host_port(DEFAULT_COLLECTOR))
    token: str | None = setting(None, "bearer token sent to the collector", flag="watch(token=)", secret=True)
    run: str | None = setting(None, "run id shared by all ranks ('none' counts as unset)", flag="watch(run=)",
                              aliases=("GRADWATCH_RUN", "TORCHELASTIC_RUN_ID"), unset=("none",),
                              shown="`<script>-<time>-<random>`")
    every: int = setting(DEFAULT_EVERY, "log every N-th optimizer step", flag="watch(every=)",
                         form=integer(ge=1), aliases=("GRADWATCH_EVERY",))
    histogram: bool = setting(DEFAULT_HISTOGRAM, "log2-magnitude histograms of every tensor",
                              aliases=("GRADWATCH_HISTOGRAM",))
    activations: bool = setting(DEFAULT_ACTIVATIONS, "statistics of every leaf module's output on logged steps",
                                aliases=("GRADWATCH_ACTIVATIONS",))
    schedule: str = setting(DEFAULT_SCHEDULE, "schedule spec (agent/capture/schedule.py); overrides `every`",
                            flag="watch(schedule=)", form=spec("schedule spec, e.g. dense:100,every:10+burst:50",
                                                               _schedule_parser),
                            aliases=("GRADWATCH_SCHEDULE",), shown="`every:<every>`")
    burst_steps: int = setting(DEFAULT_BURST_STEPS, "steps captured after a local NaN/Inf (0: off)",
                               aliases=("GRADWATCH_BURST_STEPS",))
    select: str = setting(DEFAULT_SELECT, "selection spec (agent/capture/select.py); overrides `histogram` and "
                          "`activations`", flag="watch(select=)",
                          form=spec("selection spec, e.g. preset:business,exclude:*.bias", _select_parser),
                          aliases=("GRADWATCH_SELECT",), shown="parameters + gradients")
    host_slots: int = setting(DEFAULT_HOST_SLOTS, "host buffers for reports being read (pinned on CUDA, 576 B per "
                              "watched tensor each); a step that finds all in flight is skipped, counted in "
                              "`counters.skipped_busy` and told to the aggregator (AgentDataLost)", form=integer(ge=1))
    queue_size: int = setting(DEFAULT_QUEUE_SIZE, "reports waiting for export; when full the oldest is dropped",
                              form=integer(ge=1))
    queue_bytes: int = setting(DEFAULT_QUEUE_BYTES, "encoded bytes of reports held, waiting + in flight "
                               "(>= `batch_bytes`)", form=integer(ge=1))
    batch_reports: int = setting(DEFAULT_BATCH_REPORTS, "reports per Export call at most (<= `queue_size`)",
                                 form=integer(ge=1))
    batch_bytes: int = setting(DEFAULT_BATCH_BYTES, "encoded bytes per Export call at most", form=integer(ge=1))
    export_interval_s: float = setting(DEFAULT_EXPORT_INTERVAL_S, "export at least this often while reports wait",
                                       form=number(gt=0, inf=True))
    export_timeout_s: float = setting(DEFAULT_EXPORT_TIMEOUT_S, "one deadline for an Export call and its retries",
                                      form=number(gt=0, inf=True), aliases=("GRADWATCH_EXPORT_TIMEOUT_S",))
    shutdown_timeout_s: float = setting(DEFAULT_SHUTDOWN_TIMEOUT_S, "close() flushes within this many seconds, "
                                        "then gives up: what is left is dropped, in one warning line",
                                        form=number(gt=0))
    chunk_elements: int = setting(DEFAULT_CHUNK_ELEMENTS, "tensors are summarized in chunks of this many elements",
                                  form=integer(ge=1))
    tls: bool = setting(DEFAULT_TLS, "TLS to the collector", aliases=("GRADWATCH_TLS",))
    tls_ca_file: str | None = setting(None, "PEM roots the agent trusts (needs `tls`)", form=FILE,
                                      aliases=("GRADWATCH_TLS_CA",), shown="gRPC's default roots")
    tls_cert_file: str | None = setting(None, "client certificate, for collectors that require mTLS (with "
                                        "`tls_key_file`)", form=FILE, aliases=("GRADWATCH_TLS_CERT",))
    tls_key_file: str | None = setting(None, "private key of `tls_cert_file`", form=FILE,
                                       aliases=("GRADWATCH_TLS_KEY",))
    updates_max_bytes: int = setting(DEFAULT_UPDATES_MAX_BYTES, "device memory for the parameter copy that "
                                     "updates need, on captured steps (0: no updates)", form=integer(ge=0),
                                     aliases=("GRADWATCH_UPDATES_MAX_BYTES",))
    inputs_max_channels: int = setting(DEFAULT_INPUTS_MAX_CHANNELS, "`observe_inputs`: per-channel statistics for "
                                       "tensors with at most this many channels (0: none)", form=integer(ge=0))
    labels_max_classes: int = setting(DEFAULT_LABELS_MAX_CLASSES, "`observe_inputs`: label classes counted one by "
                                      "one; higher labels count as overflow", form=integer(ge=1),
                                      aliases=("GRADWATCH_LABELS_MAX_CLASSES",))
    units_max: int = setting(DEFAULT_UNITS_MAX, "units per watched ReLU module whose activity is counted for dead "
                             "units (0: off)", form=integer(ge=0), aliases=("GRADWATCH_UNITS_MAX",))
    origin: bool = setting(DEFAULT_ORIGIN, "NaN/Inf origin check: every leaf module's output and its gradient, "
                           "on every step, names where NaN/Inf was born (agent/capture/origin.py; also "
                           "`origin:off` in `select`)")
    flush_nonfinite: bool = setting(DEFAULT_FLUSH_NONFINITE, "export a report with a NaN/Inf origin or a "
                                    "non-finite loss at once instead of at the next `export_interval_s`")
    kernels: str = setting(DEFAULT_KERNELS, "statistics kernels: `auto` builds the fused CPU kernel in the "
                           "background and uses plain torch ops until it is ready, `sync` waits for it at "
                           "`watch()`, `torch` never uses the fused kernels", form=choice("auto", "sync", "torch"),
                           aliases=("GRADWATCH_KERNELS",))

    def schedule_spec(self) -> str:
        """The effective schedule: `schedule`, else every `every` steps; with a burst unless one is given."""
        spec = self.schedule or f"every:{self.every}"
        return spec if "+burst" in spec or self.burst_steps <= 0 else f"{spec}+burst:{self.burst_steps}"

    def selection(self):
        """The effective Selection: `select` when given, else parameters and gradients with the
        `histogram` and `activations` switches; the origin check only where both `origin` and the
        selection leave it on."""
        from gradwatch.agent.capture.select import Selection

        selection = Selection.parse(self.select) if self.select else Selection(histogram=self.histogram,
                                                                                activations=self.activations)
        return selection if self.origin else selection.replace(origin=False)

    def validate(self) -> AgentConfig:
        host, _, port = self.collector.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"collector must be host:port, got {self.collector!r}")
        for name in ("every", "host_slots", "queue_size", "queue_bytes", "batch_reports", "batch_bytes",
                     "chunk_elements", "labels_max_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        # 0: no updates / no per-channel statistics / no dead-unit counts
        for name in ("updates_max_bytes", "inputs_max_channels", "units_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("export_interval_s", "export_timeout_s", "shutdown_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not math.isfinite(self.shutdown_timeout_s):
            # close() also runs at interpreter exit: an unbounded wait would hang the job's exit.
            raise ConfigError(f"shutdown_timeout_s must be a finite number of seconds, got "
                              f"{self.shutdown_timeout_s!r} (to wait longer for delivery, call flush(timeout) "
                              f"before close())")
        from gradwatch.agent.stats.kernels import MODES

        if self.kernels not in MODES:
            raise ConfigError(f"kernels must be one of {', '.join(MODES)}, got {self.kernels!r}")
        from gradwatch.agent.capture.schedule import parse

        try:
            parse(self.schedule_spec())
            self.selection()
        except ValueError as err:  # ConfigError is a ValueError too: one message shape for both
            raise ConfigError(str(err)) from None
        if self.batch_reports > self.queue_size:
            raise ConfigError("batch_reports must be <= queue_size")
        if self.queue_bytes < self.batch_bytes:
            # The batch being exported counts against the budget and cannot be dropped: it must fit.
            raise ConfigError(f"queue_bytes must be >= batch_bytes ({self.batch_bytes}), got {self.queue_bytes}")
        self._validate_tls()
        return self

    def _validate_tls(self) -> None:
        files = {"tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file,
                 "tls_key_file": self.tls_key_file}
        if not self.tls:
            given = [name for name, path in files.items() if path]
            if given:
                # Silently sending plaintext when certificates were configured would be the worse surprise.
                raise ConfigError(f"{', '.join(given)} set but tls is off (set tls=True or GRADWATCH_TLS=1)")
            return
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("a client certificate needs both tls_cert_file and tls_key_file "
                              "(GRADWATCH_TLS_CERT and GRADWATCH_TLS_KEY), or neither")
        for name, path in files.items():
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{name} {path!r} does not exist or is not readable")
