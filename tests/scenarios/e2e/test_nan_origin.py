"""End to end with real processes: a NaN born in the forward pass of a middle module of a small transformer-like
model, with the agent's DEFAULT selection (parameters and gradients, no activations), is named by the NonFinite
alert: that module, the forward pass, the bad step, rank 0. Without the agent's origin check the first
non-finite gradient in backward order (the head) would be named."""

from __future__ import annotations

import math

import pytest
import redis
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.cli.processes import wait_until
from gradwatch.cli.redis_server import RedisServer
from gradwatch.cli.stack import Stack
from tests.scenarios.e2e.test_pipeline import alerts_for, stack_config

pytestmark = pytest.mark.e2e

BAD_STEP = 8
VOCAB, WIDTH = 64, 32


class Fragile(nn.Linear):
    """A Linear whose output turns NaN while `broken`: the NaN is born in this module's forward."""

    broken = False

    def forward(self, x):
        y = super().forward(x)
        return y * math.nan if self.broken else y


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = Fragile(WIDTH, 4 * WIDTH)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.proj(self.act(self.fc(self.norm(x))))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@pytest.mark.parametrize("schedule", ["", "every:5"], ids=["default schedule", "bad step not due"])
def test_nonfinite_names_the_module_whose_forward_made_the_nan(tmp_path, schedule):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = f"e2e-nan-origin-{'due' if not schedule else 'not-due'}"
    with RedisServer(tmp_path / "redis") as server:
        cfg = stack_config(server.url)
        with Stack(cfg):
            with gradwatch.watch(model, opt, run=run, config=AgentConfig(
                    collector=cfg.collector_listen, schedule=schedule)) as w:
                for step in range(BAD_STEP + 4):
                    model.blocks[1].fc.broken = step == BAD_STEP
                    tokens = torch.randint(0, VOCAB, (4, 16))
                    logits = model(tokens[:, :-1])
                    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    w.step(loss=loss)
            client = redis.Redis.from_url(server.url)
            alerts = wait_until(lambda: [a for a in alerts_for(client, run) if a["rule"] == "NonFinite"], 20,
                                "a NonFinite alert")
    (alert,) = [a for a in alerts if a["status"] == "firing"]
    assert (alert["layer"], alert["tensor"], alert["step"], alert["rank"]) == (
        "blocks.1.fc", "blocks.1.fc:output", BAD_STEP, 0)
    assert alert["summary"].startswith(f"NaN/Inf at step {BAD_STEP} started in layer blocks.1.fc in the forward pass")
    assert alert["summary"].endswith(f"(run {run}, rank 0)")
    assert alert["value"] == "NaN" or alert["value"] > 0  # its non-finite values, "NaN" where the agent did not count
