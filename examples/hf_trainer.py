"""The Hugging Face Trainer with `GradwatchCallback`: one corrupted example (an Inf feature) wrecks a run. Its
forward pass still gives a finite loss (tanh squashes the Inf), but its backward makes the first layer's
weight gradient non-finite, the update writes NaN into the weights and every later loss is NaN. The Trainer,
with its default settings, logs no training loss in a run this short (`logging_steps` 500), and its
`logging_nan_inf_filter` puts an average of earlier losses where each NaN was (its final `train_loss` looks
fine). gradwatch takes the loss of every optimizer step itself, unfiltered, numbered as the Trainer numbers its
steps, and raises NonFinite at the step of the bad batch, naming the layer where the Inf entered. The run also
carries the TrainingArguments as hyperparameters and the statistics of every batch the Trainer fed
(`/api/v1/runs/{run}/inputs`).

    pip install 'gradwatch[integrations]'   # transformers and accelerate (the Trainer needs both)
    python examples/hf_trainer.py
"""

from __future__ import annotations

import math
import tempfile

import torch
from torch import nn

RUN = "hf-trainer-corrupted-row"
STEPS = 24
CORRUPTED_ROW = 5


class Classifier(nn.Module):
    """A model as the Trainer expects one: keyword inputs, a loss when `labels` are given."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, features, labels=None):
        logits = self.net(features)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def dataset(n: int, generator: torch.Generator) -> list[dict]:
    rows = []
    for _ in range(n):
        label = int(torch.randint(0, 3, (), generator=generator))
        features = torch.randn(8, generator=generator)
        features[label] += 2.0
        rows.append({"features": features, "labels": label})
    rows[CORRUPTED_ROW]["features"][0] = math.inf  # a broken record in the data
    return rows


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    try:
        import transformers

        from gradwatch.agent.integrations.hf import GradwatchCallback
    except ImportError:
        print("this example needs transformers and accelerate: pip install 'gradwatch[integrations]'")
        return 2
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    rows = dataset(256, torch.Generator().manual_seed(0))
    logged: list[dict] = []

    class TrainerLogs(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    with local_stack() as local, tempfile.TemporaryDirectory(prefix="gradwatch-hf-") as output_dir:
        training = transformers.TrainingArguments(
            output_dir=output_dir, max_steps=STEPS,
            per_device_train_batch_size=8, gradient_accumulation_steps=2, learning_rate=0.01,
            lr_scheduler_type="cosine", eval_strategy="steps", eval_steps=8, save_strategy="no", report_to=[],
            use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)  # logging: the defaults
        trainer = transformers.Trainer(model=Classifier(), args=training, train_dataset=rows[:192],
                                       eval_dataset=rows[192:],
                                       callbacks=[GradwatchCallback(run=RUN, collector=local.collector),
                                                  TrainerLogs()])
        print(f"\nrun {RUN}: {STEPS} optimizer steps of 2 micro-batches, row {CORRUPTED_ROW} has an Inf feature",
              flush=True)
        out = trainer.train()
        local.wait_step(RUN, STEPS)
        local.alerts.wait_for(RUN, {"NonFinite"})
        steps = [s for s in local.get(f"/api/v1/runs/{RUN}/steps?layers=0")["steps"] if s["phase"] == "train"]
        detail = local.run(RUN)
        inputs = local.get(f"/api/v1/runs/{RUN}/inputs")["inputs"]
        nonfinite = [a for a in local.firing(RUN) if a["rule"] == "NonFinite"]
    train_logs = [entry for entry in logged if "loss" in entry]
    first_nan = next((s["step"] for s in steps if s["loss"] == "NaN"), None)
    print(f"\nthe Trainer's own training-loss logs: {len(train_logs)}; its run summary: train_loss "
          f"{out.training_loss:.4g} (NaN steps filtered)")
    print("gradwatch, step by step:")
    for s in steps:
        print(f"  step {s['step']:3d}  loss {s['loss']}")
    for a in nonfinite:
        print(f"  NonFinite at step {a['step']}: {a['summary']}")
    result = {"steps": [s["step"] for s in steps], "losses": [s["loss"] for s in steps], "first_nan": first_nan,
              "trainer_loss_logs": len(train_logs), "training_loss": out.training_loss,
              "alerts": [{"rule": a["rule"], "step": a["step"], "summary": a["summary"]} for a in nonfinite],
              "hyperparameters": detail["hyperparameters"], "inputs": sorted({i["name"] for i in inputs})}
    bad = nonfinite[0]["step"] if nonfinite else None
    ok = (result["steps"] == list(range(1, STEPS + 1)) and all(s["loss"] is not None for s in steps)
          and bad is not None and first_nan in (bad, bad + 1) and not train_logs)
    return finish(args, ok, result, f"a loss at each of the Trainer's {STEPS} steps, NonFinite at step {bad} (the "
                  f"bad batch), the NaN losses from step {first_nan} on as NaN" if ok
                  else "the run did not show what it should")


if __name__ == "__main__":
    raise SystemExit(main())
