"""Agent configuration: defaults as named constants, environment overrides, validation."""

from __future__ import annotations

import os
from dataclasses import dataclass

from gradwatch.settings import ConfigError, env

DEFAULT_COLLECTOR = "127.0.0.1:4770"
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
DEFAULT_BATCH_BYTES = 2 << 20      # encoded bytes per Export call at most (collectors accept 4 MiB)
DEFAULT_EXPORT_INTERVAL_S = 0.5    # export at least this often while reports wait
DEFAULT_EXPORT_TIMEOUT_S = 10.0    # one deadline for an Export call and all of its retries
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0   # close() waits this long to flush
DEFAULT_CHUNK_ELEMENTS = 1 << 22   # tensors are summarized in chunks so temporaries stay bounded
DEFAULT_TLS = False                # plaintext unless asked; the collector decides whether it serves TLS
DEFAULT_UPDATES_MAX_BYTES = 256 << 20  # device memory for the parameter copy that updates need, on captured steps
DEFAULT_INPUTS_MAX_CHANNELS = 64   # observe_inputs: per-channel statistics for tensors with at most this many
DEFAULT_LABELS_MAX_CLASSES = 1000  # observe_inputs: classes counted one by one; higher labels count as overflow
DEFAULT_KERNELS = "auto"           # fused statistics kernels (agent/stats/kernels.py): auto | sync | torch
DEFAULT_UNITS_MAX = 65536          # units (channels, features) per watched ReLU whose activity is counted (0: off)


@dataclass
class AgentConfig:
    """Everything the agent needs; `from_env()` applies GRADWATCH_* overrides."""

    collector: str = DEFAULT_COLLECTOR
    token: str | None = None
    every: int = DEFAULT_EVERY
    histogram: bool = DEFAULT_HISTOGRAM
    activations: bool = DEFAULT_ACTIVATIONS
    schedule: str = DEFAULT_SCHEDULE
    burst_steps: int = DEFAULT_BURST_STEPS
    select: str = DEFAULT_SELECT
    host_slots: int = DEFAULT_HOST_SLOTS
    queue_size: int = DEFAULT_QUEUE_SIZE
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    batch_reports: int = DEFAULT_BATCH_REPORTS
    batch_bytes: int = DEFAULT_BATCH_BYTES
    export_interval_s: float = DEFAULT_EXPORT_INTERVAL_S
    export_timeout_s: float = DEFAULT_EXPORT_TIMEOUT_S
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    tls: bool = DEFAULT_TLS
    tls_ca_file: str | None = None    # PEM roots to trust; None: gRPC's default roots
    tls_cert_file: str | None = None  # client certificate and key, for collectors that require mTLS
    tls_key_file: str | None = None
    updates_max_bytes: int = DEFAULT_UPDATES_MAX_BYTES
    inputs_max_channels: int = DEFAULT_INPUTS_MAX_CHANNELS
    labels_max_classes: int = DEFAULT_LABELS_MAX_CLASSES
    units_max: int = DEFAULT_UNITS_MAX
    kernels: str = DEFAULT_KERNELS

    @classmethod
    def from_env(cls, **overrides) -> AgentConfig:
        """Defaults, then GRADWATCH_* environment variables, then explicit (non-None) overrides."""
        cfg = cls(
            collector=env("GRADWATCH_COLLECTOR", DEFAULT_COLLECTOR),
            token=env("GRADWATCH_TOKEN", "") or None,
            every=env("GRADWATCH_EVERY", DEFAULT_EVERY),
            histogram=env("GRADWATCH_HISTOGRAM", DEFAULT_HISTOGRAM),
            activations=env("GRADWATCH_ACTIVATIONS", DEFAULT_ACTIVATIONS),
            schedule=env("GRADWATCH_SCHEDULE", DEFAULT_SCHEDULE),
            burst_steps=env("GRADWATCH_BURST_STEPS", DEFAULT_BURST_STEPS),
            select=env("GRADWATCH_SELECT", DEFAULT_SELECT),
            queue_size=env("GRADWATCH_AGENT_QUEUE_SIZE", DEFAULT_QUEUE_SIZE),
            queue_bytes=env("GRADWATCH_AGENT_QUEUE_BYTES", DEFAULT_QUEUE_BYTES),
            export_timeout_s=env("GRADWATCH_EXPORT_TIMEOUT_S", DEFAULT_EXPORT_TIMEOUT_S),
            tls=env("GRADWATCH_TLS", DEFAULT_TLS),
            tls_ca_file=env("GRADWATCH_TLS_CA", None, str),
            tls_cert_file=env("GRADWATCH_TLS_CERT", None, str),
            tls_key_file=env("GRADWATCH_TLS_KEY", None, str),
            updates_max_bytes=env("GRADWATCH_UPDATES_MAX_BYTES", DEFAULT_UPDATES_MAX_BYTES),
            labels_max_classes=env("GRADWATCH_LABELS_MAX_CLASSES", DEFAULT_LABELS_MAX_CLASSES),
            units_max=env("GRADWATCH_UNITS_MAX", DEFAULT_UNITS_MAX),
            kernels=env("GRADWATCH_KERNELS", DEFAULT_KERNELS),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        return cfg

    def schedule_spec(self) -> str:
        """The effective schedule: `schedule`, else every `every` steps; with a burst unless one is given."""
        spec = self.schedule or f"every:{self.every}"
        return spec if "+burst" in spec or self.burst_steps <= 0 else f"{spec}+burst:{self.burst_steps}"

    def selection(self):
        """The effective Selection: `select` when given, else parameters and gradients with the
        `histogram` and `activations` switches."""
        from gradwatch.agent.capture.select import Selection

        if self.select:
            return Selection.parse(self.select)
        return Selection(histogram=self.histogram, activations=self.activations)

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
