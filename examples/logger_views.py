#!/usr/bin/env python
"""What each logger receives from the drop-in diagnostics: one short fit per logger, then a listing.

A plain LightningModule (an 8-layer ReLU MLP on random data, 3 epochs of 8 steps) with the three sampling
callbacks at their defaults, fitted once with Weights & Biases (offline), once with MLflow (a SQLite store)
and once with Lightning's CSVLogger; for each, the run folder, the images the logger holds (by tag) and the
files uploaded to it. Needs the ``wandb`` and ``mlflow`` extras (``pip install -e ".[dev]"`` has both).

    python examples/logger_views.py --out results/logger-views
"""
from __future__ import annotations

import argparse
import collections
import os
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MLP(L.LightningModule):
    def __init__(self, depth: int = 8, width: int = 32):
        super().__init__()
        layers = [nn.Linear(20, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body, self.head = nn.Sequential(*layers), nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit(logger, root: Path):
    from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(128, 20), torch.randint(0, 4, (128,)))
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=logger, default_root_dir=str(root),
                        callbacks=[ActivationSaturationMonitor(), ConditionNumberProbe(), GradientFlowMonitor()],
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MLP(), DataLoader(data, batch_size=16))
    return trainer


def by_tag(names, tag_of) -> str:
    counts = collections.Counter(map(tag_of, names))
    return "\n".join(f"    {tag}: {n}" for tag, n in sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/logger-views", help="folder for the three runs")
    out = Path(parser.parse_args().out).resolve()
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    from deepplain.callbacks.outputs import run_folder
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger

    logger = WandbLogger(save_dir=str(out / "wandb"), project="logger-views", offline=True)
    folder = run_folder(fit(logger, out / "root"))
    files = Path(logger.experiment.dir)
    wandb.finish()
    media = [p.relative_to(files / "media" / "images").as_posix() for p in (files / "media" / "images").rglob("*.png")]
    uploaded = [p for p in (files / "deepplain").rglob("*") if p.is_file()]
    print(f"W&B (offline): run folder {folder}\n  {len(media)} media images under "
          f"{len({m.rsplit('_', 2)[0] for m in media})} keys:\n{by_tag(media, lambda m: m.rsplit('_', 2)[0])}\n"
          f"  {len(uploaded)} files under {files / 'deepplain'}")

    logger = MLFlowLogger(experiment_name="logger-views", tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
                          artifact_location=(out / "mlartifacts").as_uri())
    folder = run_folder(fit(logger, out / "root"))
    client, run = logger.experiment, logger.run_id

    def walk(path=None):
        for item in client.list_artifacts(run, path):
            yield from walk(item.path) if item.is_dir else [item.path]
    artifacts = list(walk())
    images = [a for a in artifacts if a.startswith("images/") and a.endswith(".png")]
    tag = lambda a: a.split("/", 1)[1].split("+step+")[0].replace("~", "/")  # noqa: E731
    steps = [m.step for m in client.get_metric_history(run, "overview/layers_vanished")]
    print(f"MLflow (SQLite): run folder {folder}\n  {len(images)} images under {len({tag(a) for a in images})} keys:\n"
          f"{by_tag(images, tag)}\n  {sum(a.startswith('deepplain/') for a in artifacts)} artifacts under deepplain/; "
          f"{len(client.get_run(run).data.metrics)} metric keys; overview/layers_vanished at steps {steps}")

    folder = run_folder(fit(CSVLogger(str(out / "csv"), name="csv"), out / "root"))
    columns = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    print(f"CSV: run folder {folder}\n  metrics.csv {len(columns)} columns; {len(list((folder / 'figures').rglob('*.png')))} "
          f"PNG figures; diagnostics.csv {(folder / 'diagnostics.csv').is_file()}, overview.png "
          f"{(folder / 'overview.png').is_file()}")


if __name__ == "__main__":
    main()
