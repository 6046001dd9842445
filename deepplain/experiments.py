"""The PlainNet paper's experiments as commands, on the paper's recipe.

    python -m deepplain.experiments diagnostics --dataset usps --epochs 30 --out results/usps-diag
    python -m deepplain.experiments ablation    --dataset usps --epochs 30 --out results/usps-ablation \\
        --lrs 1e-3,1e-2,1e-1
    python -m deepplain.experiments ablation    --dataset usps --epochs 300 --out results/usps-table2-300 \\
        --lr-per-row bn_lrelu=0.01,bn=0.001,bn_maxnorm=0.001,lrelu=0.001,maxnorm=0.001,lrelu_maxnorm=0.001,\\
bn_lrelu_maxnorm=0.01

Every run starts from the ``oyedotun-mlp-100`` preset (100 hidden layers of 300 units, He-uniform
init, SGD with momentum 0.9, weight decay 1e-4, batch 128, lr 0.01 divided by 10 at 50% and 75% of
the epochs); only the components under study change, and ``--epochs`` is the budget (the paper
trains 300). Without ``--lrs`` each configuration trains once on the whole training split and its
test error is reported, as in the paper. With ``--lrs`` it trains once per learning rate on 90% of
the training split; the rate with the best accuracy on the held-out 10% is chosen, and both that
choice and every rate are tabulated. With ``--lr-per-row`` each configuration trains once, on the whole
training split, at the rate given for it (say, the one a shorter ``--lrs`` grid chose), in the order
given.

``diagnostics`` trains the three 100-layer variants (naive: no BN, ReLU; BN: BN + ReLU; proposed:
BN + LeakyReLU 0.3 + max-norm 3) and draws, from the diagnostics' own functions on the whole
training split in eval mode: mean and max |activation| per layer (Fig. 2-4), the infinity-norm
condition number of each layer's weight (Fig. 5), the share of activations above 0.05 (Fig. A1)
and the units' responses at the middle and last hidden layers (Fig. 6-8). ``ablation`` trains the
seven component combinations of Table II and writes its markdown table beside the paper's: per row the
running train error of the last epoch, the error on the whole training split in eval mode (from the
final checkpoint), the final test error and the best epoch's (on the held-out split with ``--lrs``).
Both reuse the sweep runner (finished runs are skipped) and pass extra train.py flags after ``--``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .callbacks.condition import representation_matrix, weight_matrix
from .callbacks.linalg import weight_conditions
from .callbacks.probing import LayerCapture, eval_mode, hidden_layers, weight_layers
from .callbacks.saturation import activation_stats, combine
from .config import merge
from .curves import read_curves
from .datamodules import DATASETS
from .datamodules.paths import resolve_data_env
from .errors import ConfigError
from .family_modules import module_class
from .inputs import OneLineParser, output_dir
from .plan import make_datamodule
from .presets import PRESETS
from .rundir import SWEEP_RUNS, RunFolder, SweepFolder
from .schema import flag, from_dict
from .status import FINISHED, RunStatus
from .sweep import Run, collect, exit_status, options_of, run_grid_stoppable, split_at_double_dash

RECIPE_PRESET = "oyedotun-mlp-100"
COMPONENT_KEYS = ("norm", "activation", "negative_slope", "max_norm")  # what the experiments vary
NOT_RECIPE = ("model", "arch", "depth", "dataset", "epochs", *COMPONENT_KEYS)
HELD_OUT = 0.1  # the share of the training split --lrs holds out to choose a rate
MLP_DATASETS = [name for name, d in DATASETS.items() if d.arch == "mlp" and d.reads_files]  # the paper's MLPs' kind


def components(bn: bool, lrelu: bool, max_norm: bool) -> dict:
    """The options of one combination of the paper's three components, each as the recipe sets it; the naive
    net (BN off, ReLU, no max-norm) for the ones left out."""
    recipe = PRESETS[RECIPE_PRESET]
    return {"norm": recipe["norm"] if bn else "none",
            **({"activation": recipe["activation"], "negative_slope": recipe["negative_slope"]} if lrelu
               else {"activation": "relu"}),
            **({"max_norm": recipe["max_norm"]} if max_norm else {})}


VARIANTS = {  # the diagnostics' three nets: name -> options
    "naive": components(bn=False, lrelu=False, max_norm=False),
    "bn": components(bn=True, lrelu=False, max_norm=False),
    "proposed": components(bn=True, lrelu=True, max_norm=True),
}
# Table II of Oyedotun et al. (USPS, 100-layer MLP): component -> (options, (train error %, test error %))
ABLATION = {
    "BN": (components(bn=True, lrelu=False, max_norm=False), (84.56, 83.21)),
    "LReLU": (components(bn=False, lrelu=True, max_norm=False), (92.37, 92.03)),
    "Max-norm": (components(bn=False, lrelu=False, max_norm=True), (86.22, 86.85)),
    "BN + LReLU": (components(bn=True, lrelu=True, max_norm=False), (78.38, 79.52)),
    "BN + max-norm": (components(bn=True, lrelu=False, max_norm=True), (82.90, 81.86)),
    "LReLU + max-norm": (components(bn=False, lrelu=True, max_norm=True), (83.62, 82.11)),
    "BN + LReLU + max-norm": (VARIANTS["proposed"], (0.11, 5.48)),
}


def recipe_options(lr: float | None = None, held_out: bool = False) -> dict:
    """The preset's recipe as options, without the components the experiments vary."""
    options = {key: value for key, value in PRESETS[RECIPE_PRESET].items()
               if not key.startswith("_") and key not in NOT_RECIPE}
    if lr is not None:
        options["lr"] = lr
    return {**options, "val_split": HELD_OUT if held_out else 0, "diagnostics": "none"}


def slug(name: str) -> str:
    return name.lower().replace(" + ", "_").replace("-", "").replace(" ", "")


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def train_variants(variants: dict, out: Path, dataset: str, depth: int, epochs: int, extra: dict,
                   lrs: list[float] | None = None, parallel: int = 1,
                   lr_per_row: dict[str, float] | None = None, train: bool = True) -> list[dict]:
    """Train every variant (name -> options; ``extra``: the options given after ``--``): at every learning rate
    of ``lrs`` (on the held-out split), or once each at its rate in ``lr_per_row`` (in that order, on the whole
    training split); returns the sweep's rows."""
    if lr_per_row:
        grid = [(name, variants[name], lr) for name, lr in lr_per_row.items()]
    else:
        grid = [(name, options, lr) for name, options in variants.items() for lr in (lrs or [None])]
    runs = [Run("plain", depth, 0, name if lr is None else f"{name}-{lr_tag(lr)}",
                {**recipe_options(lr, held_out=bool(lrs)), **options, **extra}) for name, options, lr in grid]
    rows = run_grid_stoppable(runs, out, dataset, epochs, parallel) if train else collect(runs, out, dataset)
    by_id = {r["run_id"]: r for r in rows}
    for run, (name, _, lr) in zip(runs, grid):
        by_id[run.run_id].update(configuration=name, lr=lr, held_out=bool(lrs))
    return rows


def best_per_configuration(rows: list[dict]) -> dict[str, dict]:
    """configuration -> its row at the learning rate with the best held-out accuracy (finished runs first)."""
    best = {}
    for r in rows:
        accuracy = float(r["val_acc"]) if r.get("val_acc") not in (None, "") else -1.0
        score = (r["status"] == RunStatus.COMPLETED, accuracy)
        name = r["configuration"]
        if name not in best or score > best[name][0]:
            best[name] = (score, r)
    return {name: row for name, (_, row) in best.items()}


def _errors(r: dict, keys=("train_acc", "val_acc", "test_acc")) -> list[str]:
    if r.get("status") != RunStatus.COMPLETED:  # a diverged run's last epoch metrics are not its result
        done = f" after {r['epochs_done']} epochs" if r.get("epochs_done") not in (None, "") else ""
        return [f"{r.get('status') or 'missing'}{done}"] * len(keys)
    return [f"{100 * (1 - float(r[k])):.2f}%" if r.get(k) not in (None, "") else "-" for k in keys]


@torch.no_grad()
def eval_mode_train_accuracy(checkpoint: Path, max_samples: int = 100_000) -> float:
    """Accuracy on the run's whole training split in eval mode (running BN statistics), from its checkpoint:
    the paper's "training error", which the running accuracy logged during the last epoch only approximates."""
    config = from_dict(json.loads(RunFolder.of_checkpoint(checkpoint).config.read_text()))
    module = module_class(config.model).load_from_checkpoint(checkpoint, map_location="cpu")
    dm = make_datamodule(config, data_dir=config.data_root or config.data_dir)
    x, y = dm.probe_batch(max_samples, split="train")
    with eval_mode(module):
        predicted = torch.cat([module(chunk).argmax(1) for chunk in x.split(1024)])
    return (predicted == y).float().mean().item()


def after_training(r: dict) -> dict:
    """A finished row's eval-mode train accuracy and its best epoch on the validation split (the test split
    when the run held nothing out), read from the run's checkpoint and event files."""
    if r.get("status") != RunStatus.COMPLETED or not r.get("run_dir"):
        return {}
    run_dir = Path(r["run_dir"])
    eval_error = read_curves(run_dir)["eval_error"]
    best_epoch, best_error = min(eval_error, key=lambda point: point[1])
    return {"train_acc_eval": eval_mode_train_accuracy(RunFolder(run_dir).last_checkpoint),
            "best_val_acc": 1.0 - best_error, "best_epoch": int(best_epoch)}


# -- diagnostics --------------------------------------------------------------------------------------
@torch.no_grad()
def analyse(checkpoint: Path, max_samples: int = 10_000) -> dict:
    """Per-layer statistics of a trained run on its whole training split, with the callbacks' functions."""
    config = from_dict(json.loads(RunFolder.of_checkpoint(checkpoint).config.read_text()))
    module = module_class(config.model).load_from_checkpoint(checkpoint, map_location="cpu")
    # the data exactly as the run read it: its folder, image size and split (flags after -- included)
    dm = make_datamodule(config, data_dir=config.data_root or config.data_dir)
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
        fig = Figure(figsize=(6, 3.8), dpi=120)
        ax = fig.add_subplot()
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
    for layer in layers:
        fig = Figure(figsize=(4 * len(results), 3.4), dpi=120)
        axes = fig.subplots(1, len(results))
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
    return paths


def run_diagnostics(args, extra) -> int:
    out = Path(args.out)
    rows = train_variants(VARIANTS, out, args.dataset, args.depth, args.epochs, extra, args.lrs, args.parallel,
                          args.lr_per_row)
    chosen = best_per_configuration(rows)
    results = {}
    for variant in VARIANTS:
        run_dir = chosen[variant].get("run_dir")
        ckpt = RunFolder(run_dir).last_checkpoint if run_dir else None
        if ckpt is None or not ckpt.is_file():
            print(f"error: variant {variant} left no checkpoint; see {SweepFolder(out).runs}", file=sys.stderr)
            return 1
        results[variant] = analyse(ckpt)
    summary = {v: {"stats": r["stats"], "weights": r["weights"], "samples": r["samples"],
                   "lr": chosen[v]["lr"], "train_acc": chosen[v]["train_acc"], "test_acc": chosen[v]["test_acc"]}
               for v, r in results.items()}
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=1, default=float))
    for path in diagnostic_figures(results, out / "figures", layers=(args.depth // 2, args.depth - 1)):
        print(f"wrote {path}")
    for variant, r in chosen.items():
        print(f"{variant}: status {r['status']}, lr {r['lr'] or 'preset'}, train acc {r['train_acc']}, "
              f"test acc {r['test_acc']}")
    return 0


# -- ablation ------------------------------------------------------------------------------------------
def ablation_table(rows: list[dict]) -> str:
    """Table II: ours (at the chosen learning rate, when there is a grid) beside the paper's."""
    chosen = best_per_configuration(rows)
    grid = any(r.get("lr") is not None for r in rows)
    held_out = any(r.get("held_out") for r in rows)
    best = "best held-out error (epoch)" if held_out else "best test error (epoch)"
    head = "| model component |" + (" lr |" if grid else "") + (" train error (ours) | train error, eval mode | "
                                                                f"test error (ours) | {best} | "
                                                                "train error (paper) | test error (paper) |")
    lines = [head, "|---|" + ("---|" if grid else "") + "---|" * 6]
    for name, (_, (paper_train, paper_test)) in ABLATION.items():
        r = chosen.get(slug(name), {})
        train, train_eval, test, best = _errors(r, ("train_acc", "train_acc_eval", "test_acc", "best_val_acc"))
        if r.get("best_epoch") is not None:
            best += f" ({r['best_epoch']})"
        lr = f" {r['lr']:g} |" if grid and r.get("lr") is not None else (" - |" if grid else "")
        lines.append(f"| {name} |{lr} {train} | {train_eval} | {test} | {best} | {paper_train:.2f}% | "
                     f"{paper_test:.2f}% |")
    return "\n".join(lines)


def grid_table(rows: list[dict]) -> str:
    """Every configuration at every learning rate: train, held-out and test errors."""
    lrs = sorted({r["lr"] for r in rows if r.get("lr") is not None})
    lines = ["| model component | " + " | ".join(f"lr {lr:g}: train / held-out / test" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    by_key = {(r["configuration"], r["lr"]): r for r in rows}
    for name in ABLATION:
        cells = [" / ".join(_errors(by_key.get((slug(name), lr), {}))) for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def experiment_variants(experiment: str) -> dict[str, dict]:
    """The configurations an experiment compares: name (as run folders and --lr-per-row spell it) -> options."""
    return VARIANTS if experiment == "diagnostics" else {slug(name): options
                                                         for name, (options, _) in ABLATION.items()}


def run_ablation(args, extra) -> int:
    rows = train_variants(experiment_variants("ablation"), Path(args.out), args.dataset, args.depth, args.epochs,
                          extra, args.lrs, args.parallel, args.lr_per_row, train=not args.table_only)
    for r in best_per_configuration(rows).values():  # the same row objects: the table reads what this adds
        r.update(after_training(r))
    text = ablation_table(rows)
    if args.lrs:
        text += "\n\nEvery learning rate (errors on the training split, the held-out 10% and the test set):\n\n"
        text += grid_table(rows)
    (Path(args.out) / "ablation.md").write_text(text + "\n")
    print(text)
    return 0 if all(r["status"] in FINISHED for r in rows) else 1


def _lrs(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates, got {text!r}") from None
    if not values or any(not 0 < v < 10 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be in (0, 10), got {text!r}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:  # each rate is one row of the grid: the same rate twice would train it twice
        raise argparse.ArgumentTypeError(f"{', '.join(f'{v:g}' for v in twice)} given twice in {text!r}")
    return values


def _lr_per_row(text: str) -> dict[str, float]:
    rates = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if not name.strip() or rate is None or not 0 < rate < 10 or name.strip() in rates:
            raise argparse.ArgumentTypeError(f"expected ROW=LR pairs, each row once, rates in (0, 10); got {item!r}")
        rates[name.strip()] = rate
    return rates


def main(argv=None) -> int:
    resolve_data_env()
    p = OneLineParser(prog="python -m deepplain.experiments", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("experiment", choices=["diagnostics", "ablation"])
    p.add_argument("--dataset", default=PRESETS[RECIPE_PRESET]["dataset"], choices=MLP_DATASETS)
    p.add_argument("--depth", type=int, default=PRESETS[RECIPE_PRESET]["depth"])
    p.add_argument("--epochs", type=int, required=True, help="the budget (the paper: 300)")
    p.add_argument("--lrs", type=_lrs, default=None, help="learning-rate grid, chosen per row on a held-out 10%%")
    p.add_argument("--lr-per-row", type=_lr_per_row, default=None, metavar="ROW=LR,...",
                   help="one learning rate per configuration, on the whole training split (every row named, "
                        "run in this order)")
    p.add_argument("--out", required=True)
    p.add_argument("--table-only", action="store_true",
                   help="ablation: write the table from the runs already in --out (finished or not), training nothing")
    p.add_argument("--parallel", type=int, default=1)
    own, extra = split_at_double_dash(argv)
    args = p.parse_args(own)

    def command() -> int:
        options = check_experiment(args, extra)
        return run_diagnostics(args, options) if args.experiment == "diagnostics" else run_ablation(args, options)
    return exit_status(command)


def check_experiment(args, extra: list[str]) -> dict:
    """Everything about the command that can be wrong, before any variant trains: the numbers, the output
    folder, flags after -- that the experiment sets itself, and the options of every variant as train.py
    checks them (without reading data). Returns the options given after --."""
    if args.epochs < 1 or args.depth < 1 or args.parallel < 1:
        raise ConfigError("--epochs, --depth and --parallel must be positive")
    if args.table_only and args.experiment != "ablation":
        raise ConfigError("--table-only tabulates the ablation; the diagnostics need every variant finished")
    extra = options_of(extra, "after --")
    variants = experiment_variants(args.experiment)
    if args.lr_per_row:
        if args.lrs:
            raise ConfigError("--lrs and --lr-per-row both set the learning rates; give one")
        named = set(args.lr_per_row)
        if named != set(variants):
            wrong = sorted(named - set(variants))
            raise ConfigError(f"--lr-per-row must give a rate for every {args.experiment} configuration: "
                              + (f"unknown {', '.join(wrong)}; " if wrong else "")
                              + f"missing {', '.join(sorted(set(variants) - named)) or 'none'} "
                              f"(the configurations: {', '.join(variants)})")
    compared = {*COMPONENT_KEYS, "val_split"}
    if args.lrs or args.lr_per_row:
        compared.add("lr")  # the grid sets it; without --lrs a common --lr is the user's choice for every variant
    varied = sorted(flag(name) for name in set(extra) & compared)
    if varied:
        raise ConfigError(f"{', '.join(varied)} after -- would change what the experiment compares; its variants "
                          "set them")
    for name, options in variants.items():
        lr = args.lrs[0] if args.lrs else (args.lr_per_row or {}).get(name)
        merge({**recipe_options(lr, held_out=bool(args.lrs)), **options, **extra, "model": "plain",
               "depth": args.depth, "dataset": args.dataset, "epochs": args.epochs})
    if args.table_only and not SweepFolder(args.out).runs.is_dir():  # a typo would tabulate an empty folder
        raise ConfigError(f"--table-only: {args.out} holds no runs of this experiment (no {SWEEP_RUNS}/ folder); "
                          "check --out")
    output_dir(args.out)  # last: bad flags leave nothing behind
    return extra


if __name__ == "__main__":
    sys.exit(main())
