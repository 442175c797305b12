"""On-demand snapshots: each kind against an explicit reference, and a real training loop whose collector
(a real gRPC server on 127.0.0.1) asks for them, with no host read on the training thread."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.agent.capture.snapshots import channel_importance, feature_maps, pca_2d, weight_heatmap
from gradwatch.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from gradwatch.v1.snapshot_pb2 import SnapshotKind, SnapshotRequest

K = SnapshotKind


def test_weight_heatmap_is_the_block_mean_of_abs_w():
    w = torch.randn(128, 256)
    ref = w.abs().reshape(64, 2, 64, 4).mean((1, 3))
    torch.testing.assert_close(weight_heatmap(w), ref)
    conv = torch.randn(8, 3, 3, 3)  # out x (in * kh * kw), small enough to keep every cell
    torch.testing.assert_close(weight_heatmap(conv), conv.abs().reshape(8, 27))
    assert weight_heatmap(torch.randn(5)).shape == (1, 5)


def test_feature_maps_are_the_first_samples_channels_pooled():
    y = torch.randn(2, 20, 64, 16)
    maps = feature_maps(y)
    assert maps.shape == (16, 32, 16)
    torch.testing.assert_close(maps, y[0, :16].reshape(16, 32, 2, 16).mean(2))
    assert feature_maps(torch.randn(4, 10)).shape == (1, 1, 10)


def test_channel_importance_is_abs_grad_times_activation_per_channel():
    conv = nn.Conv2d(3, 6, 3)
    y = conv(torch.randn(4, 3, 8, 8))
    y.retain_grad()
    y.pow(2).sum().backward()
    ref = (y.grad * y).abs().sum((0, 2, 3))
    torch.testing.assert_close(channel_importance(y, y.grad, 1), ref)


def test_pca_2d_matches_the_svd_projection_up_to_sign():
    torch.manual_seed(0)
    x = torch.randn(500, 10) * torch.tensor([5.0, 3.0] + [0.5] * 8) + 7
    for rows in (x, x[:6]):  # covariance (n > d) and Gram (n < d) paths
        xc = rows - rows.mean(0)
        u, s, _ = torch.linalg.svd(xc, full_matrices=False)
        ref = u[:, :2] * s[:2]
        got = pca_2d(rows)
        sign = torch.sign((got * ref).sum(0))
        torch.testing.assert_close(got * sign, ref, atol=1e-3, rtol=1e-3)


class AskingIngest(ingest_service_pb2_grpc.IngestServiceServicer):
    """Answers the first export with the snapshot requests given, records what comes back."""

    def __init__(self, requests):
        self.to_ask = list(requests)
        self.snapshots = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            self.snapshots.extend(request.snapshots)
            asked, self.to_ask = self.to_ask, []
        return ingest_service_pb2.ExportResponse(snapshot_requests=asked)


@pytest.fixture
def asking():
    servers = []

    def start(requests):
        servicer = AskingIngest(requests)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)
        servicer.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        servers.append(server)
        return servicer

    yield start
    for server in servers:
        server.stop(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3000, 8)
        self.conv = nn.Conv2d(3, 20, 3, padding=1)
        self.head = nn.Linear(20, 2)

    def forward(self, x, tokens):
        y = torch.relu(self.conv(x))
        return self.head(y.mean((2, 3))) + self.embed(tokens).mean(1)[:, :2]


def test_training_loop_captures_every_kind_without_host_reads(asking, host_reads):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: references computed after the loop
    x, tokens = torch.randn(4, 3, 40, 40), torch.randint(0, 3000, (4, 5))
    wanted = [SnapshotRequest(id="h", run_id="snap-1", kind=K.SNAPSHOT_KIND_WEIGHT_HEATMAP, tensor="conv"),
              SnapshotRequest(id="f", run_id="snap-1", kind=K.SNAPSHOT_KIND_FEATURE_MAPS, tensor="conv"),
              SnapshotRequest(id="c", run_id="snap-1", kind=K.SNAPSHOT_KIND_CHANNEL_IMPORTANCE, tensor="conv"),
              SnapshotRequest(id="p", run_id="snap-1", kind=K.SNAPSHOT_KIND_PROJECTION, tensor="embed"),
              SnapshotRequest(id="a", run_id="snap-1", kind=K.SNAPSHOT_KIND_PROJECTION, tensor="conv"),
              SnapshotRequest(id="x", run_id="snap-1", kind=K.SNAPSHOT_KIND_FEATURE_MAPS, tensor="nope")]
    ingest = asking(wanted)
    config = AgentConfig(collector=ingest.target, export_interval_s=0.05)
    w = gradwatch.watch(model, opt, run="snap-1", config=config)
    deadline = time.monotonic() + 20
    while len(ingest.snapshots) < len(wanted) and time.monotonic() < deadline:
        model(x, tokens).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        w.step()
        time.sleep(0.02)
    w.close()
    assert host_reads == []
    got = {s.request_id: s for s in ingest.snapshots}
    assert sorted(got) == sorted(r.id for r in wanted)

    h = got["h"]
    assert (h.rows, h.cols, list(h.shape)) == (20, 27, [20, 3, 3, 3])
    torch.testing.assert_close(torch.tensor(h.values).reshape(20, 27), model.conv.weight.detach().abs().reshape(20, 27))

    y = model.conv(x)
    f = got["f"]
    assert (f.maps, f.rows, f.cols, list(f.shape)) == (16, 32, 32, [4, 20, 40, 40])
    torch.testing.assert_close(torch.tensor(f.values).reshape(16, 32, 32), feature_maps(y))

    y.retain_grad()
    out = torch.relu(y)
    (model.head(out.mean((2, 3))) + model.embed(tokens).mean(1)[:, :2]).pow(2).mean().backward()
    c = got["c"]
    assert (c.rows, c.cols) == (1, 20)
    torch.testing.assert_close(torch.tensor(c.values), (y.grad * y).abs().sum((0, 2, 3)), rtol=1e-4, atol=1e-6)

    p = got["p"]
    assert (p.rows, p.cols, list(p.shape)) == (1500, 2, [3000, 8]) and p.labels[:3] == ["0", "2", "4"]
    emb = model.embed.weight.detach()[::2]
    xc = emb - emb.mean(0)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    ref = u[:, :2] * s[:2]
    pts = torch.tensor(p.values).reshape(1500, 2)
    torch.testing.assert_close(pts.abs().sum(0), ref.abs().sum(0), rtol=0.05, atol=0.05)  # up to sign
    a = got["a"]
    assert (a.rows, a.cols) == (1600, 2) and list(a.shape) == [4, 20, 40, 40]  # 6,400 positions, every 4th

    assert "no module or parameter named 'nope'" in got["x"].error and not got["x"].values
    assert w.counters.internal_errors == 0
