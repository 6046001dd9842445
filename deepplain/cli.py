"""``train.py``: train any family on any dataset with the diagnostics on, from one command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from .config import merge, model_options
from .errors import ConfigError, DatasetError, DeepplainError, DivergenceError
from .presets import describe_presets

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line on stderr (and exit status 2)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _int_or_auto(value: str):
    return value if value == "auto" or "," in value else int(value)


def _count_or_fraction(value: str):
    number = float(value)
    return int(number) if number.is_integer() and number >= 1 else number


def _milestones(value: str):
    try:
        return [float(v) for v in value.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"milestones must be comma-separated numbers, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from datamodules import DATAMODULES
    from .registry import model_names
    p = OneLineParser(
        prog="train.py", argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a very deep network with or without skip connections, with layer-by-layer diagnostics.",
        epilog="presets (--preset NAME; explicit flags override them):\n" + describe_presets() +
               "\n\nexample: python train.py --model van --depth 26   # VAN-26 on CIFAR-10, the paper's recipe")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=model_names(), help="model family (default plain)")
    g.add_argument("--depth", type=int, help="depth; each family has its rule (van conv: 8n+2, dirac conv: 6n+4, ...)")
    g.add_argument("--width", type=int, help="MLP: units per layer; conv: widening factor k")
    g.add_argument("--arch", choices=["mlp", "conv"], help="default: conv for CIFAR/imagefolder, mlp otherwise")
    g.add_argument("--activation", choices=["relu", "lrelu", "prelu"], help="plain family only")
    g.add_argument("--negative-slope", type=float, help="LeakyReLU slope / PReLU initial slope (default 0.3)")
    g.add_argument("--norm", choices=["bn", "none"])
    g.add_argument("--init", choices=["he-uniform", "he-normal", "glorot-uniform", "orthogonal", "default"])
    g.add_argument("--layout", help="plain conv: vgg | oyedotun-50; dirac conv: cifar | imagenet")
    g.add_argument("--block", choices=["basic", "bottleneck"], help="resnet conv block type")
    g.add_argument("--gate-bias", type=float, help="highway transform-gate bias init (default -2)")
    g.add_argument("--max-norm", type=float, help="add MaxNormConstraint with this bound (PlainNet: 3)")
    g.add_argument("--preset", help="load a named recipe (listed below)")
    g = p.add_argument_group("VAN")
    g.add_argument("--alpha-mode", choices=["lagrangian", "unconstrained", "linear", "cosine", "off"])
    g.add_argument("--lambda-lr-ratio", type=float, help="eta'/eta (default 0.5 for MLPs, 0.1 for conv)")
    g.add_argument("--phase-out-epochs", type=int, help="epoch at which linear/cosine modes reach alpha = 1")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DATAMODULES), help="default cifar10")
    g.add_argument("--data-dir", help="data root (else $DEEPPLAIN_DATA, else ./data)")
    g.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    g.add_argument("--val-split", type=float, help="share of the training split held out (0 = validate on test)")
    g.add_argument("--skip-checksums", dest="verify_checksums", action="store_false",
                   help="do not check files against torchvision's published md5 (re-packed or custom files)")
    g.add_argument("--image-size", type=int, help="COIL-20 / imagefolder image side (default 32 / 224)")
    g.add_argument("--num-workers", type=int, help="DataLoader workers (folder datasets only)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, help="not applied to biases, norms, alpha, Dirac a/b")
    g.add_argument("--optimizer", choices=["sgd", "adam"])
    g.add_argument("--schedule", choices=["multistep", "cosine", "none"])
    g.add_argument("--milestones", type=_milestones, help="comma-separated; values < 1 are fractions of --epochs")
    g.add_argument("--gamma", type=float, help="multistep decay factor (default 0.1)")
    g.add_argument("--accumulate-grad-batches", type=int)
    g = p.add_argument_group("hardware")
    g.add_argument("--precision", help="32-true | bf16-mixed | 16-mixed | ...")
    g.add_argument("--accelerator", help="auto | cpu | gpu | ...")
    g.add_argument("--devices", type=_int_or_auto)
    g.add_argument("--strategy", help="auto | ddp | ddp_spawn | fsdp | ...")
    g.add_argument("--num-nodes", type=int)
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--deterministic", action="store_true")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--logdir", help="default runs")
    g.add_argument("--name", help="default <model>-<arch>-<depth>-<dataset>")
    g.add_argument("--fast-dev-run", action="store_true", help="one batch of train/val/test, nothing logged")
    g.add_argument("--limit-train-batches", type=_count_or_fraction)
    g.add_argument("--limit-val-batches", type=_count_or_fraction)
    g.add_argument("--resume", help="<run>/checkpoints/last.ckpt: continue that run")
    g.add_argument("--diagnostics", help="all | none | comma list of saturation,condition,grad_flow (default all)")
    g.add_argument("--diag-every", type=int, help="sampling interval in steps for every diagnostic")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_args(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    return vars(args)


def load_resume_config(explicit: dict) -> dict:
    """For --resume: the run's saved config, with only explicit flags that may change overriding it."""
    ckpt = Path(explicit["resume"])
    if not ckpt.is_file():
        raise ConfigError(f"--resume checkpoint {ckpt} does not exist")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found; pass a checkpoint inside a deepplain run folder")
    config = json.loads(saved.read_text())
    changeable = {"epochs", "resume", "accelerator", "devices", "strategy", "num_nodes", "precision", "progress",
                  "limit_train_batches", "limit_val_batches", "num_workers", "data_dir", "diag_every"}
    fixed = sorted(k for k in explicit if k not in changeable and explicit[k] != config.get(k))
    if fixed:
        raise ConfigError(f"--resume continues the saved run; these flags cannot change: "
                          f"{', '.join('--' + k.replace('_', '-') for k in fixed)}")
    config.update(explicit)
    config["run_dir"] = str(run_dir)
    return config


def build_diagnostics(config: dict) -> list:
    from callbacks import DIAGNOSTICS
    spec = config["diagnostics"]
    if spec in (None, "none", ""):
        return []
    names = list(DIAGNOSTICS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in DIAGNOSTICS]
    if unknown:
        raise ConfigError(f"unknown diagnostics {', '.join(unknown)}; valid: all, none, {', '.join(DIAGNOSTICS)}")
    every = config.get("diag_every")
    return [DIAGNOSTICS[n](every_n_steps=every) for n in names]


def make_datamodule(config: dict):
    from datamodules import get_datamodule
    kwargs = dict(data_dir=config.get("data_dir"), batch_size=config["batch_size"], val_split=config["val_split"],
                  seed=config["seed"], download=config["download"], num_workers=config["num_workers"])
    if config["dataset"] != "imagefolder":
        kwargs["verify_checksums"] = config["verify_checksums"]
    if config.get("image_size") is not None:
        if config["dataset"] not in ("coil20", "imagefolder"):
            raise ConfigError(f"--image-size applies to coil20 and imagefolder, got --dataset {config['dataset']}")
        kwargs["image_size"] = config["image_size"]
    return get_datamodule(config["dataset"], **kwargs)


def make_module(config: dict, input_shape, num_classes):
    from .family_modules import VANModule, module_class
    cls = module_class(config["model"])
    kwargs = dict(model=config["model"], depth=config["depth"], arch=config["arch"], input_shape=tuple(input_shape),
                  num_classes=num_classes, model_options=model_options(config), optimizer=config["optimizer"],
                  lr=config["lr"], momentum=config["momentum"], nesterov=config["nesterov"],
                  weight_decay=config["weight_decay"], schedule=config["schedule"], milestones=config["milestones"],
                  gamma=config["gamma"], max_norm=config["max_norm"], channels_last=config["channels_last"],
                  compile=config["compile"])
    if cls is VANModule:
        kwargs.update(alpha_mode=config["alpha_mode"], lambda_lr_ratio=config["lambda_lr_ratio"],
                      phase_out_epochs=config["phase_out_epochs"])
    return cls(**kwargs)


def run(config: dict) -> dict:
    """Train, test and summarise one run; returns the summary written to ``summary.json``."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichModelSummary, RichProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from .layers import count_parameters
    from .report import print_trainability_report
    from .rundir import atomic_write_json, reserve_run_dir
    from .runtime import DivergenceGuard, InterruptCheckpoint, RNGState, RunStats

    L.seed_everything(config["seed"], workers=True, verbose=False)
    datamodule = make_datamodule(config)
    datamodule.setup("fit")  # decode once, here: shapes and class counts are needed to build the model
    module = make_module(config, datamodule.input_shape, datamodule.num_classes)

    name = config.get("name") or f"{config['model']}-{config['arch']}-{config['depth']}-{config['dataset']}"
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else reserve_run_dir(config["logdir"], name)
    config["run_dir"] = str(run_dir)
    is_rank_zero = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    if is_rank_zero and not config.get("resume"):
        atomic_write_json(run_dir / "config.json", dict(config))
    logger = TensorBoardLogger(save_dir=str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name,
                               default_hp_metric=False)
    ckpt_dir = run_dir / "checkpoints"
    stats, interrupt = RunStats(), InterruptCheckpoint(ckpt_dir)
    diagnostics = build_diagnostics(config)
    # Two checkpointers: save_last alone would only refresh last.ckpt when val/acc improves.
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
                                 monitor="val/acc", mode="max", save_top_k=1),
                 ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False),
                 LearningRateMonitor(logging_interval="epoch"), RichModelSummary(max_depth=2), stats, interrupt,
                 RNGState(), DivergenceGuard(), *diagnostics]
    if config.get("progress", True):
        callbacks.append(RichProgressBar())
    trainer = L.Trainer(
        max_epochs=config["epochs"], accelerator=config["accelerator"], devices=config["devices"],
        strategy=config["strategy"], num_nodes=config["num_nodes"], precision=config["precision"], logger=logger,
        callbacks=callbacks, fast_dev_run=config["fast_dev_run"], limit_train_batches=config["limit_train_batches"],
        limit_val_batches=config["limit_val_batches"], accumulate_grad_batches=config["accumulate_grad_batches"],
        deterministic=config["deterministic"], enable_progress_bar=config.get("progress", True),
        log_every_n_steps=min(50, max(1, _batches_per_epoch(datamodule, config))))
    if trainer.is_global_zero and datamodule.validation_source == "test set":
        logger.experiment.add_text("warnings", "val_split=0: validation metrics are measured on the TEST set")

    status, error, metrics = "completed", None, {}
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C after the first one; restored below
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=config.get("resume"))
        metrics.update(_floats(trainer.callback_metrics))  # trainer.test() resets callback_metrics
        if trainer.state.status.value == "interrupted":
            status = "interrupted"
        else:
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(_floats(trainer.callback_metrics))
    except SystemExit:  # Lightning's Ctrl-C handling ends with sys.exit(1)
        status = "interrupted"
    except Exception as exc:  # recorded in summary.json, then reported by main() or as a traceback (a bug)
        status = "diverged" if isinstance(exc, DivergenceError) else "failed"
        error = str(exc) if isinstance(exc, DeepplainError) else f"{type(exc).__name__}: {exc}"
        raise
    finally:
        signal.signal(signal.SIGINT, sigint)
        if not metrics:
            metrics.update(_floats(trainer.callback_metrics))
        summary = _summary(config, trainer, metrics, datamodule, stats, interrupt, status, error,
                           count_parameters(module.model))
        if trainer.is_global_zero:
            atomic_write_json(run_dir / "summary.json", summary)
    if trainer.is_global_zero and status == "completed":
        print_trainability_report(diagnostics)
        print(f"run folder: {run_dir}")
    return summary


def _batches_per_epoch(datamodule, config) -> int:
    sizes = getattr(datamodule, "split_sizes", None) or {"train": 1}
    return -(-sizes["train"] // config["batch_size"])


def _floats(metrics) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def _summary(config, trainer, metrics, datamodule, stats, interrupt, status, error, parameters) -> dict:
    ckpt = next((cb for cb in trainer.checkpoint_callbacks), None)
    return {
        "status": status, "error": error,
        "model": config["model"], "arch": config["arch"], "depth": config["depth"], "dataset": config["dataset"],
        "parameters": parameters, "epochs_done": trainer.current_epoch, "global_step": trainer.global_step,
        "train_loss": metrics.get("train/loss_epoch"), "train_acc": metrics.get("train/acc"),
        "val_loss": metrics.get("val/loss"), "val_acc": metrics.get("val/acc"),
        "test_loss": metrics.get("test/loss"), "test_acc": metrics.get("test/acc"),
        "wall_seconds": stats.wall_seconds, "samples_per_second": stats.samples_per_second,
        "validation_source": getattr(datamodule, "validation_source", None),
        "split_sizes": getattr(datamodule, "split_sizes", None),
        "best_checkpoint": (ckpt.best_model_path or None) if ckpt else None,
        "interrupt_checkpoint": str(interrupt.saved) if interrupt.saved else None,
        "run_dir": config["run_dir"], "config": dict(config),
    }


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def main(argv=None) -> int:
    explicit = parse_args(argv)
    _quiet_libraries()
    try:
        config = load_resume_config(explicit) if explicit.get("resume") else merge(explicit)
        summary = run(config)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DeepplainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(exc, DivergenceError) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary["status"] == "interrupted":
        where = summary["interrupt_checkpoint"] or "no checkpoint could be saved"
        print(f"interrupted: {where}; resume with --resume {Path(summary['run_dir']) / 'checkpoints' / 'last.ckpt'}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
