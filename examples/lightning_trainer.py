"""Lightning with `GradwatchCallback`: a LightningModule whose loader forgot the transform and feeds raw 0..255
pixels. The callback passes every training batch to `observe_inputs`, so the aggregator raises
UnnormalizedInput on the images (and counts the labels, the batch's last element); it captures gradients where
Lightning's optimizer step has them final, reports the loss of every optimizer step (the accumulated batches
added up as Lightning does), numbers steps as Lightning's loggers do, and registers the module's
`save_hyperparameters()` and the Trainer's settings as the run's hyperparameters.

    pip install 'gradwatch[integrations]'   # lightning
    python examples/lightning_trainer.py
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

RUN = "lightning-raw-pixels"
STEPS = 12
ACCUMULATE = 2


def images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images of 8-bit pixel values (the ToTensor/Normalize step is missing) whose brightest channel is
    the class."""
    labels = torch.randint(0, 3, (n,), generator=generator)
    x = torch.randint(40, 180, (n, 3, 12, 12), generator=generator).float()
    x[torch.arange(n), labels] += 60
    return x, labels


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    try:
        import lightning.pytorch as pl

        from gradwatch.agent.integrations.lightning import GradwatchCallback
    except ImportError:
        print("this example needs lightning: pip install 'gradwatch[integrations]'")
        return 2

    class ConvNet(pl.LightningModule):
        def __init__(self, lr: float = 0.01, channels: int = 8):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(channels, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    x, y = images(STEPS * ACCUMULATE * 16, torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with local_stack() as local, tempfile.TemporaryDirectory(prefix="gradwatch-lightning-") as root:
        trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0,
                             callbacks=[GradwatchCallback(run=RUN, collector=local.collector)], logger=False,
                             accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=root)
        print(f"\nrun {RUN}: {STEPS} optimizer steps of {ACCUMULATE} batches of raw 0..255 images", flush=True)
        trainer.fit(ConvNet(), loader)
        local.wait_step(RUN, STEPS - 1)
        local.alerts.wait_for(RUN, {"UnnormalizedInput"})
        detail = local.run(RUN)
        steps = [s for s in local.get(f"/api/v1/runs/{RUN}/steps?layers=0")["steps"] if s["phase"] == "train"]
        inputs = local.get(f"/api/v1/runs/{RUN}/inputs")["inputs"]
        alerts = [a for a in local.firing(RUN) if a["rule"] == "UnnormalizedInput"]
    image = next(i for i in inputs if i["name"] == "inputs.0" and i["channel"] is None)
    print(f"\nhyperparameters: {detail['hyperparameters']}")
    print(f"steps {steps[0]['step']}..{steps[-1]['step']}, every one with a loss: "
          f"{all(s['loss'] is not None for s in steps)}")
    print(f"inputs.0: mean {image['mean']:.1f}, min {image['min']:.0f}, max {image['max']:.0f}")
    result = {"steps": [s["step"] for s in steps], "losses": [s["loss"] for s in steps],
              "hyperparameters": detail["hyperparameters"],
              "inputs": {"mean": image["mean"], "min": image["min"], "max": image["max"]},
              "alerts": [{"rule": a["rule"], "tensor": a["tensor"], "step": a["step"], "summary": a["summary"]}
                         for a in alerts]}
    ok = (result["steps"] == list(range(STEPS)) and all(s["loss"] is not None for s in steps) and bool(alerts)
          and detail["hyperparameters"].get("lr") == 0.01 and detail["hyperparameters"].get("accumulate_grad_batches")
          == ACCUMULATE)
    return finish(args, ok, result, "raw pixels caught from the batches the callback observed; the module's "
                  "hparams and the Trainer's settings registered" if ok else "the run did not show what it should")


if __name__ == "__main__":
    raise SystemExit(main())
