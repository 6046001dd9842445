"""The PlainNet paper's experiments as commands.

    python -m deepplain.experiments diagnostics --dataset usps --depth 100 --epochs 30 --out results/usps-diag
    python -m deepplain.experiments ablation    --dataset usps --depth 100 --epochs 30 --out results/usps-ablation

``diagnostics`` trains the three 100-layer MLP variants (naive: no BN, ReLU; BN: BN + ReLU;
proposed: BN + LeakyReLU 0.3 + max-norm 3 + He-uniform) and draws, from the diagnostics'
statistics on the whole training set: mean and max |activation| per layer (Fig. 2-4), the
infinity-norm condition number of each layer's weights (Fig. 5), the share of activations above
0.05 per layer (Fig. A1) and the units' responses at layers 50 and 99 (Fig. 6-8).
``ablation`` trains the seven component combinations of Table II and prints its markdown table.
Both reuse the sweep runner (finished runs are skipped) and pass extra train.py flags after ``--``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .sweep import FINISHED, Run, run_grid, split_at_double_dash

COMMON = ["--init", "he-uniform", "--width", "300"]
VARIANTS = {
    "naive": ["--norm", "none", "--activation", "relu"],
    "bn": ["--norm", "bn", "--activation", "relu"],
    "proposed": ["--norm", "bn", "--activation", "lrelu", "--negative-slope", "0.3", "--max-norm", "3"],
}
# Table II of Oyedotun et al. (USPS, 100-layer MLP): component -> (train error %, test error %)
ABLATION = {
    "BN": (["--norm", "bn", "--activation", "relu"], (84.56, 83.21)),
    "LReLU": (["--norm", "none", "--activation", "lrelu", "--negative-slope", "0.3"], (92.37, 92.03)),
    "Max-norm": (["--norm", "none", "--activation", "relu", "--max-norm", "3"], (86.22, 86.85)),
    "BN + LReLU": (["--norm", "bn", "--activation", "lrelu", "--negative-slope", "0.3"], (78.38, 79.52)),
    "BN + max-norm": (["--norm", "bn", "--activation", "relu", "--max-norm", "3"], (82.90, 81.86)),
    "LReLU + max-norm": (["--norm", "none", "--activation", "lrelu", "--negative-slope", "0.3", "--max-norm", "3"],
                         (83.62, 82.11)),
    "BN + LReLU + max-norm": (VARIANTS["proposed"], (0.11, 5.48)),
}


def slug(name: str) -> str:
    return name.lower().replace(" + ", "_").replace("-", "").replace(" ", "")


def train_variants(variants: dict, out: Path, dataset: str, depth: int, epochs: int, extra: list[str],
                   parallel: int = 1) -> list[dict]:
    runs = [Run("plain", depth, 0, name, [*flags, *COMMON, "--diagnostics", "none", *extra])
            for name, flags in variants.items()]
    return run_grid(runs, out, dataset, epochs, parallel)


# -- diagnostics --------------------------------------------------------------------------------------
@torch.no_grad()
def analyse(checkpoint: Path, max_samples: int = 10_000) -> dict:
    """Per-layer statistics of a trained run on its whole training split, with the callbacks' functions."""
    from .callbacks.condition import representation_matrix, weight_conditions, weight_matrix
    from .callbacks.probing import LayerCapture, eval_mode, hidden_layers, weight_layers
    from .callbacks.saturation import activation_stats, combine
    from .datamodules import get_datamodule
    from .family_modules import module_class
    config = json.loads((checkpoint.parent.parent / "config.json").read_text())
    module = module_class(config["model"]).load_from_checkpoint(checkpoint, map_location="cpu")
    dm = get_datamodule(config["dataset"], val_split=config["val_split"], seed=config["seed"])
    dm.setup()
    x = dm.probe_batch(max_samples, split="train")[0]
    layers = hidden_layers(module)
    stats, responses = {}, {}

    def reduce(name, out):
        sums, alive = activation_stats(out, 0.05, 50.0)
        return combine(sums.unsqueeze(0), alive.unsqueeze(0)), representation_matrix(out, max_rows=x.shape[0])
    with eval_mode(module), LayerCapture(layers, reduce) as capture:
        module(x)
    for index, (name, (row, matrix)) in enumerate(capture.results.items(), start=1):
        stats[name] = row
        responses[index] = matrix
    weights = {}
    for name, layer in weight_layers(module, skip_classifier=True):
        kappa, kappa_inf = weight_conditions(weight_matrix(layer))
        weights[name] = {"kappa": kappa, "kappa_inf": kappa_inf}
    return {"stats": stats, "weights": weights, "responses": responses, "samples": int(x.shape[0])}


def diagnostic_figures(results: dict[str, dict], out: Path, layers=(50, 99)) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    panels = [("mean_abs_activation", "mean |activation|",
               lambda r: [s["mean_abs"] for s in r["stats"].values()], True),
              ("max_abs_activation", "max |activation|", lambda r: [s["max_abs"] for s in r["stats"].values()], True),
              ("weight_condition_inf", "infinity-norm condition number of weights",
               lambda r: [w["kappa_inf"] for w in r["weights"].values()], True),
              ("share_above_0.05", "share of activations with |a| > 0.05",
               lambda r: [1.0 - s["frac_low"] for s in r["stats"].values()], False)]
    for filename, ylabel, getter, log in panels:
        fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
        for variant, result in results.items():
            values = np.asarray(getter(result), dtype=float)
            values = np.where(np.isfinite(values), values, np.nan)
            ax.plot(np.arange(1, len(values) + 1), values, label=variant)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(out / f"{filename}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    for layer in layers:
        fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4), dpi=120)
        for ax, (variant, result) in zip(np.atleast_1d(axes), results.items()):
            matrix = result["responses"].get(layer)
            if matrix is None:
                ax.set_visible(False)
                continue
            image = ax.imshow(matrix.numpy().T, aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set_title(f"{variant}: layer {layer}")
            ax.set_xlabel("training sample")
            ax.set_ylabel("unit")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        paths.append(out / f"responses_layer{layer}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def run_diagnostics(args, extra) -> int:
    out = Path(args.out)
    rows = train_variants(VARIANTS, out, args.dataset, args.depth, args.epochs, extra, args.parallel)
    results = {}
    for variant in VARIANTS:
        ckpt = next(iter(sorted((out / "runs" / Run("plain", args.depth, 0, variant).run_id).glob(
            "*/checkpoints/last.ckpt"))), None)
        if ckpt is None:
            print(f"error: variant {variant} left no checkpoint; see {out / 'runs'}", file=sys.stderr)
            return 1
        results[variant] = analyse(ckpt)
    summary = {v: {"stats": r["stats"], "weights": r["weights"], "samples": r["samples"]} for v, r in results.items()}
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=1, default=float))
    for path in diagnostic_figures(results, out / "figures", layers=(args.depth // 2, args.depth - 1)):
        print(f"wrote {path}")
    for r in rows:
        print(f"{r['variant']}: status {r['status']}, train acc {r['train_acc']}, test acc {r['test_acc']}")
    return 0


# -- ablation ------------------------------------------------------------------------------------------
def ablation_table(rows: list[dict]) -> str:
    by_variant = {r["variant"]: r for r in rows}
    lines = ["| model component | train error (ours) | test error (ours) | train error (paper) | test error (paper) |",
             "|---|---|---|---|---|"]
    for name, (_, (paper_train, paper_test)) in ABLATION.items():
        r = by_variant.get(slug(name), {})
        if r.get("status") == "completed":
            ours = [f"{100 * (1 - float(r[k])):.2f}%" for k in ("train_acc", "test_acc")]
        else:  # a diverged run's last epoch metrics are not its result
            ours = [r.get("status") or "missing"] * 2
        lines.append(f"| {name} | {ours[0]} | {ours[1]} | {paper_train:.2f}% | {paper_test:.2f}% |")
    return "\n".join(lines)


def run_ablation(args, extra) -> int:
    variants = {slug(name): flags for name, (flags, _) in ABLATION.items()}
    rows = train_variants(variants, Path(args.out), args.dataset, args.depth, args.epochs, extra, args.parallel)
    table = ablation_table(rows)
    (Path(args.out) / "ablation.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["status"] in FINISHED for r in rows) else 1


def main(argv=None) -> int:
    from .cli import OneLineParser
    p = OneLineParser(prog="python -m deepplain.experiments", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("experiment", choices=["diagnostics", "ablation"])
    p.add_argument("--dataset", default="usps")
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--parallel", type=int, default=1)
    own, extra = split_at_double_dash(argv)
    args = p.parse_args(own)
    return run_diagnostics(args, extra) if args.experiment == "diagnostics" else run_ablation(args, extra)


if __name__ == "__main__":
    sys.exit(main())
