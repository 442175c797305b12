"""Size limits of what agents send, shared by the agent (which truncates, batches and downsamples to them) and
the components that receive it (which refuse or leave out anything bigger): messages, strings, scalars, and
on-demand snapshots, a picture for a page, never a tensor dump."""

from __future__ import annotations

import re

from gradwatch.v1.snapshot_pb2 import SnapshotKind

# Names, labels and scalar keys: the collector's default max_string_bytes; the agent truncates to it.
MAX_STRING_BYTES = 1024

# One ExportRequest: the collector's default max_message_bytes (gRPC's own default receive limit). The agent's
# default batch of reports is half of it, leaving room for the registration and snapshots in the same request.
MAX_MESSAGE_BYTES = 4 << 20
BATCH_BYTES = MAX_MESSAGE_BYTES // 2

# User scalars per run and phase the aggregator exports on /metrics (aggregator/http/metrics.py); a gradient
# check (agent/gradcheck.py) sends no more, so all of its scalars are shown.
EXPORTED_SCALARS = 32

HEATMAP_CELLS = 64          # a weight heatmap is at most 64 x 64 average-pooled cells
FEATURE_MAPS = 16           # at most 16 channels of a module's output ...
FEATURE_MAP_PIXELS = 32     # ... each average-pooled to at most 32 x 32
IMPORTANCE_CHANNELS = 4096  # per-channel importance of at most 4,096 channels (more are pooled)
PROJECTION_POINTS = 2000    # a PCA projection of at most 2,000 sampled rows
LABEL_BYTES = 64            # per point label of a projection

KINDS = {
    SnapshotKind.SNAPSHOT_KIND_WEIGHT_HEATMAP: "weight_heatmap",
    SnapshotKind.SNAPSHOT_KIND_FEATURE_MAPS: "feature_maps",
    SnapshotKind.SNAPSHOT_KIND_CHANNEL_IMPORTANCE: "channel_importance",
    SnapshotKind.SNAPSHOT_KIND_PROJECTION: "projection",
}
KIND_BY_NAME = {name: kind for kind, name in KINDS.items()}

# (maps, rows, cols) at most, per kind.
BOUNDS = {
    SnapshotKind.SNAPSHOT_KIND_WEIGHT_HEATMAP: (1, HEATMAP_CELLS, HEATMAP_CELLS),
    SnapshotKind.SNAPSHOT_KIND_FEATURE_MAPS: (FEATURE_MAPS, FEATURE_MAP_PIXELS, FEATURE_MAP_PIXELS),
    SnapshotKind.SNAPSHOT_KIND_CHANNEL_IMPORTANCE: (1, 1, IMPORTANCE_CHANNELS),
    SnapshotKind.SNAPSHOT_KIND_PROJECTION: (1, PROJECTION_POINTS, 2),
}

REQUEST_ID_CHARS, REQUEST_ID_MAX_CHARS = "A-Za-z0-9_-", 64
REQUEST_ID_RE = re.compile(rf"^[{REQUEST_ID_CHARS}]{{1,{REQUEST_ID_MAX_CHARS}}}$")
REQUEST_ID_RULE = f"1-{REQUEST_ID_MAX_CHARS} characters of [{REQUEST_ID_CHARS}]"  # what a refusal says
