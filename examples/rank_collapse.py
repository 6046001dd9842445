#!/usr/bin/env python
"""Rank collapse in a deep attention-only Transformer, caught by ConditionNumberProbe.

Dong, Cordonnier and Loukas (2021), *Attention is not all you need: pure attention loses rank doubly
exponentially with depth*: without skip connections (and MLPs), stacked self-attention drives every
token of a sequence towards the same vector. This script builds that network (token embedding, then
``--depth`` ``nn.MultiheadAttention`` layers, mean pooling, a classifier), drops the unmodified
``ConditionNumberProbe`` into a short Lightning fit, and prints, per attention layer, what the probe
measured on one probe sequence of ``--tokens`` tokens (a tokens x channels matrix; see
``deepplain.callbacks.layer_outputs``): kappa, the share of near-zero singular values and the mean
|correlation| between channels, next to the paper's own measure computed here independently, the
relative residual ``||X - 1 x^T||_F / ||X||_F`` of the tokens from their mean. The same network with
a skip connection around each attention layer is the control.

    python examples/rank_collapse.py --depth 24 --out docs/figures/rank_collapse.png
"""
from __future__ import annotations

import argparse
import math
import warnings

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepplain.callbacks import ConditionNumberProbe


class Attention(nn.Module):
    """One self-attention layer, with or without a skip connection around it."""

    def __init__(self, width: int, heads: int, skip: bool):
        super().__init__()
        self.attn, self.skip = nn.MultiheadAttention(width, heads, batch_first=True), skip

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return x + out if self.skip else out


class AttentionOnly(L.LightningModule):
    def __init__(self, depth: int, width: int = 32, heads: int = 2, features: int = 64, skip: bool = False):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.layers = nn.Sequential(*[Attention(width, heads, skip) for _ in range(depth)])
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.layers(self.embed(x)).mean(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def relative_residuals(model: AttentionOnly, sequence: torch.Tensor) -> list[float]:
    """``||X - 1 x^T||_F / ||X||_F`` of each attention layer's output on one sequence (Dong et al.'s res)."""
    out = []
    with torch.no_grad():
        x = model.eval().embed(sequence)
        for layer in model.layers:
            x = layer(x)
            tokens = x[0].double()
            out.append(float((tokens - tokens.mean(0)).norm() / tokens.norm()))
    return out


def measure(depth: int, skip: bool, tokens: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = AttentionOnly(depth, skip=skip)
    g = torch.Generator().manual_seed(seed)
    data = DataLoader(TensorDataset(torch.randn(64, tokens, 64, generator=g), torch.randint(0, 4, (64,), generator=g)),
                      batch_size=16)
    sequence = torch.randn(1, tokens, 64, generator=g)
    probe = ConditionNumberProbe(every_n_steps=1, max_overhead=None, probe_batch=sequence, weights=False,
                                 include=["layers.*.attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[probe]).fit(model, data)
    stats = [probe.last_stats[f"layers.{i}.attn"] for i in range(depth)]
    return {"kappa": [s["kappa"] for s in stats], "near_zero": [s["near_zero"] for s in stats],
            "collinearity": [s["collinearity"] for s in stats], "rank": [s["rank"] for s in stats],
            "residual": relative_residuals(model, sequence)}


def figure(results: dict, path: str) -> None:
    fig = Figure(figsize=(10, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    panels = [("kappa", "probe: condition number (log)", True), ("collinearity", "probe: mean |corr| between channels",
              False), ("residual", "||X - 1x^T|| / ||X|| (log; exactly 0 drawn at 1e-17)", True)]
    for index, (key, label, log) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 3, index)
        for name, result in results.items():
            values = np.asarray(result[key], dtype=float)
            if key == "residual":
                values = np.maximum(values, 1e-17)  # exact collapse would leave the log axis
            finite = np.where(np.isfinite(values), values, np.nan)
            ax.plot(np.arange(1, len(values) + 1), finite, marker="o", markersize=3, label=name)
            inf = np.nonzero(np.isinf(values))[0]
            if inf.size:
                ax.plot(inf + 1, np.full(inf.size, np.nanmax(finite) if np.isfinite(finite).any() else 1.0), "x",
                        color="red", label=f"{name}: kappa = inf")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("attention layer")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("rank collapse of token representations in an attention-only Transformer (at initialisation)",
                 fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.84, wspace=0.3)
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="a PNG for the figure")
    args = parser.parse_args(argv)
    results = {"attention only": measure(args.depth, False, args.tokens, args.seed),
               "attention + skip": measure(args.depth, True, args.tokens, args.seed)}
    shown = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, args.depth} & set(range(1, args.depth + 1)))
    print("| layer | " + " | ".join(f"{n}: kappa / near-zero share / mean corr / residual" for n in results) + " |")
    print("|---|" + "---|" * len(results))
    for layer in shown:
        cells = []
        for result in results.values():
            i = layer - 1
            kappa = result["kappa"][i]
            cells.append(f"{'inf' if math.isinf(kappa) else f'{kappa:.3g}'} / {result['near_zero'][i]:.2f} / "
                         f"{result['collinearity'][i]:.2f} / {result['residual'][i]:.2e}")
        print(f"| {layer} | " + " | ".join(cells) + " |")
    if args.out:
        figure(results, args.out)
        print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
