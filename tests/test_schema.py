"""The fast tier: the run schema, the family and dataset records, the run status, and the pieces
derived from them; no training (``pytest -m fast`` runs these files in seconds)."""
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from deepplain.callbacks.alpha import (
    PAPER_LAMBDA_LR_RATIO,
    SCHEDULES,
    UPDATE_RULES,
    AlphaScheduler,
    lagrangian_step,
    lagrangian_steps,
)
from deepplain.datamodules import DATASETS, get_dataset
from torch import nn

from deepplain import ConfigError, build_model
from deepplain.cli import build_parser, main
from deepplain.config import merge
from deepplain.family_modules import module_class
from deepplain.module import ImageClassifier
from deepplain.plan import make_datamodule
from deepplain.preflight import estimate, measure
from deepplain.registry import DepthRule, families_taking, get_family, model_names, register
from deepplain.schema import CHANGEABLE_ON_RESUME, DEFAULTS, OPTIONS, Range, RunConfig, flag, options_for
from deepplain.status import FINISHED, RESUMABLE, RunStatus, RunSummary
from deepplain.sweep import CSV_FIELDS
from deepplain.training import make_module

pytestmark = pytest.mark.fast


# -- the schema and what is derived from it ----------------------------------------------------------
def test_every_option_has_one_flag_and_the_parser_knows_no_other():
    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.option_strings} - {"help", "config", "print_config"}
    assert dests == {name for name, o in OPTIONS.items() if o.on_command_line}
    assert {"run_dir", "data_root"} == {name for name, o in OPTIONS.items() if not o.on_command_line}


def test_parser_defaults_are_the_schemas():
    parsed = vars(build_parser().parse_args([]))
    assert parsed == {}  # nothing is explicit unless given: merge() adds the schema's defaults once
    config = merge({"dataset": "usps"})
    for name in ("seed", "gamma", "momentum", "label_smoothing", "val_split", "logdir", "diagnostics", "progress"):
        assert getattr(config, name) == DEFAULTS[name]


@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if isinstance(o.valid, Range)])
def test_every_range_is_checked_with_the_flag_in_the_message(name):
    valid = OPTIONS[name].valid
    outside = (valid.low - 1 if valid.low is not None else None) if valid.high is None else valid.high + 1
    if outside is None:
        outside = float("nan")
    dataset = "coil20" if name == "image_size" else "usps"
    extra = {"epochs": 5} if name == "phase_out" else {}
    values = {"dataset": dataset, "model": (families_taking(name) or ("plain",))[0], name: outside, **extra}
    with pytest.raises(ConfigError, match="^" + re.escape(f"{flag(name)} must be {valid.what}")):
        merge(values)


def test_range_bounds_against_hand_checks():
    unit = Range("in [0, 1)", 0, 1, high_open=True)
    assert [unit.error("--x", v) is None for v in (0, 0.5, 0.999, 1, -0.01, math.inf, True, "0.5")] == [
        True, True, True, False, False, False, False, False]
    integer = Range("a positive integer", low=1, integer=True)
    assert [integer.error("--n", v) is None for v in (1, 7, 0, 1.0, False)] == [True, True, False, False, False]


def test_what_resume_may_change_is_the_schemas():
    assert CHANGEABLE_ON_RESUME == {
        "epochs", "resume", "accelerator", "devices", "strategy", "num_nodes", "precision", "progress",
        "limit_train_batches", "limit_val_batches", "num_workers", "data_dir", "diag_every", "dist_timeout",
        "download", "verify_checksums", "per_layer_scalars", "logger"}


def test_family_options_apply_only_to_their_family():
    van, plain = merge({"model": "van", "dataset": "usps"}), merge({"model": "plain", "dataset": "usps"})
    assert "alpha_mode" in options_for(van, "module") and "alpha_mode" not in options_for(plain, "module")
    with pytest.raises(ConfigError, match="^--alpha-mode applies to --model van only, got --model plain$"):
        merge({"model": "plain", "dataset": "usps", "alpha_mode": "linear"})


def test_run_config_is_frozen_and_round_trips_through_a_dict():
    config = merge({"model": "van", "dataset": "usps", "label_smoothing": 0.1})
    with pytest.raises(Exception):
        config.depth = 3
    assert RunConfig(**config.to_dict()) == config and config.replace(depth=3).depth == 3


# -- --label-smoothing, the option added through the schema --------------------------------------------
def test_label_smoothing_flag_range_and_print_config(capsys):
    assert main(["--dataset", "usps", "--label-smoothing", "0.1", "--print-config"]) == 0
    assert "label_smoothing: 0.1" in capsys.readouterr().out
    assert main(["--dataset", "usps", "--label-smoothing", "1", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == "error: --label-smoothing must be in [0, 1), got 1.0"


def test_label_smoothing_reaches_the_training_loss_only():
    torch.manual_seed(0)
    module = ImageClassifier("plain", depth=2, arch="mlp", input_shape=(1, 4, 4), num_classes=5,
                             model_options={"width": 8}, label_smoothing=0.2)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        train_loss, val_loss = module._step((x, y), "train"), module._step((x, y), "val")
        logp = torch.log_softmax(module(x).double(), dim=1)
    eps, k = 0.2, 5
    target = torch.full_like(logp, eps / k).scatter_(1, y[:, None], 1 - eps + eps / k)  # the smoothed target
    assert float(train_loss) == pytest.approx(float(-(target * logp).sum(1).mean()), rel=1e-5)
    assert float(val_loss) == pytest.approx(float(F.nll_loss(logp, y)), rel=1e-5)
    assert float(train_loss) != pytest.approx(float(val_loss), rel=1e-3)


def test_the_cli_passes_label_smoothing_to_the_module():
    config = merge({"dataset": "usps", "depth": 2, "label_smoothing": 0.3})
    assert make_module(config, (1, 16, 16), 10).hparams.label_smoothing == 0.3


# -- family records ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", model_names())
def test_every_form_builds_at_its_default_depth_and_at_its_rules_first_depths(name):
    family = get_family(name)
    assert module_class(name).family == name
    for arch, form in family.forms.items():
        shape = (3, 32, 32) if arch == "conv" else (1, 16, 16)
        for rule in form.depth_rules:
            for depth in [form.default_depth, *rule.first_depths(2)]:
                with torch.device("meta"):
                    build_model(name, depth, arch=arch, input_shape=shape, num_classes=10)


def test_depth_rule_arithmetic():
    rule = DepthRule(8, 2, examples="10, 18, ...")
    assert [d for d in range(40) if rule.allows(d)] == [10, 18, 26, 34] and rule.blocks(26) == 3
    assert rule.first_depths(2) == [10, 18] and rule.describe() == "8n+2 (10, 18, ...)"
    fixed = DepthRule(fixed=(18, 34))
    assert fixed.allows(34) and not fixed.allows(26) and fixed.describe() == "18 or 34"


@pytest.mark.parametrize("model,arch,depth,options", [("van", "conv", 8 * 40 + 2, {}), ("plain", "mlp", 300, {}),
                                                      ("resnet", "conv", 9 * 40 + 2, {}),
                                                      ("resnet", "conv", 6 * 50 + 2, {"block": "basic"})])
def test_memory_estimate_from_the_depth_rule_equals_a_direct_build(model, arch, depth, options):
    config = merge({"model": model, "arch": arch, "depth": depth, "dataset": "cifar10", **options})
    shape = (3, 32, 32)
    direct = measure(config, depth, shape, 10)
    assert estimate(config, shape, 10) == direct


def test_register_refuses_a_second_form_of_the_same_name():
    with pytest.raises(ConfigError, match="model plain already has a 'mlp' form"):
        register("plain", "mlp", default_depth=3)(lambda depth, *, input_shape, num_classes: nn.Identity())


def test_builders_take_their_defaults_from_their_class():
    with torch.device("meta"):
        model = build_model("plain", 3, arch="mlp", input_shape=(1, 4, 4))
    assert model.classifier.in_features == 300  # PlainMLP's own default width


# -- dataset records -------------------------------------------------------------------------------------
def test_dataset_records_drive_the_recipe_and_the_checks():
    assert {n for n, d in DATASETS.items() if d.arch == "conv"} == {"cifar10", "cifar100", "imagefolder"}
    assert merge({"dataset": "coil20", "image_size": 16}).image_size == 16
    with pytest.raises(ConfigError, match="^--image-size applies to coil20 and imagefolder, got --dataset mnist$"):
        merge({"dataset": "mnist", "image_size": 16})
    folder = merge({"dataset": "imagefolder", "data_dir": "/x"})
    assert folder.val_split == 0.0 and folder.arch == "conv"
    with pytest.raises(ConfigError, match="--dataset imagefolder validates on its own val/ split"):
        merge({"dataset": "imagefolder", "data_dir": "/x", "val_split": 0.1})


def test_datamodule_gets_only_the_options_its_dataset_takes():
    folder = make_datamodule(merge({"dataset": "imagefolder", "data_dir": "/x", "image_size": 64}))
    assert folder.image_size == 64 and folder.data_dir == "/x"
    usps = make_datamodule(merge({"dataset": "usps", "val_split": 0.2, "seed": 3}))
    assert (usps.val_split, usps.seed, usps.verify_checksums) == (0.2, 3, True)
    assert not get_dataset("fake").reads_files


# -- run status and summary ----------------------------------------------------------------------------
def test_run_status_sets_find_the_strings_read_back_from_files():
    assert "completed" in FINISHED and "diverged" in FINISHED and "interrupted" not in FINISHED
    assert RESUMABLE == {"interrupted", "preempted"} and f"{RunStatus.FAILED} (exit 3)" == "failed (exit 3)"
    assert RunSummary(status="preempted").status is RunStatus.PREEMPTED


def test_sweep_columns_come_from_the_summary():
    assert CSV_FIELDS[0] == "run_id" and CSV_FIELDS[-1] == "flags"
    assert CSV_FIELDS[2:-1] == RunSummary.csv_columns()
    assert {"status", "test_acc", "alpha_removed_step", "seed"} <= set(CSV_FIELDS)


# -- AlphaScheduler's parts ----------------------------------------------------------------------------
def test_schedules_are_functions_of_the_step():
    assert [SCHEDULES["linear"].alpha(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert SCHEDULES["cosine"].alpha(5, 10) == pytest.approx(0.5) and SCHEDULES["cosine"].alpha(10, 10) == 1.0


def test_lagrangian_step_against_hand_computation():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.tensor([0.0, 0.5, 0.99]))
            self.register_buffer("lagrange_lambda", torch.tensor([-1.0, -1.0, -2.0]))
    gate, grad = Gate(), torch.tensor([0.1, -0.2, 0.0])
    lagrangian_step(gate, grad, eta_alpha=0.1, eta_lambda=0.05, constrained=True)
    alpha = torch.tensor([0.0 - 0.1 * (0.1 - 1), 0.5 - 0.1 * (-0.2 - 1), min(1.0, 0.99 - 0.1 * (0 - 2))])
    assert torch.allclose(gate.alpha.detach(), alpha)
    assert torch.allclose(gate.lagrange_lambda, torch.tensor([-1.0, -1.0, -2.0]) + 0.05 * (alpha - 1))
    before = gate.alpha.detach().clone()
    lagrangian_step(gate, torch.tensor([float("nan"), 0.0, 0.0]), 0.1, 0.05, True)  # a skipped step
    assert torch.equal(gate.alpha.detach(), before)
    # every gate at once (different sizes): each as on its own; a non-finite gradient anywhere skips the step
    gates = [Gate(), Gate()]
    gates[1].alpha = nn.Parameter(torch.tensor([0.2, 0.4]))
    gates[1].lagrange_lambda = torch.tensor([-1.0, -3.0])
    alone = [Gate(), Gate()]
    alone[1].alpha, alone[1].lagrange_lambda = nn.Parameter(torch.tensor([0.2, 0.4])), torch.tensor([-1.0, -3.0])
    grads = [torch.tensor([0.1, -0.2, 0.0]), torch.tensor([0.3, 0.05])]
    closed = lagrangian_steps(gates, grads, 0.1, 0.05, True)
    for gate, g in zip(alone, grads):
        lagrangian_step(gate, g, 0.1, 0.05, True)
    for a, b in zip(gates, alone):
        assert torch.equal(a.alpha, b.alpha) and torch.equal(a.lagrange_lambda, b.lagrange_lambda)
    assert torch.equal(closed, torch.cat([gates[0].alpha, gates[1].alpha]))
    before = [g.alpha.detach().clone() for g in gates]
    lagrangian_steps(gates, [torch.zeros(3), torch.tensor([1.0, float("inf")])], 0.1, 0.05, True)
    assert all(torch.equal(g.alpha.detach(), b) for g, b in zip(gates, before))
    assert UPDATE_RULES["literal"].step_sizes(0.1, 0.5) == (0.1, 0.05)
    assert UPDATE_RULES["unconstrained"].step_sizes(0.1, 0.5) == (0.1, 0.0)


@pytest.mark.parametrize("arch,ratio", [("mlp", PAPER_LAMBDA_LR_RATIO["mlp"]), ("conv", PAPER_LAMBDA_LR_RATIO["conv"])])
def test_lambda_ratio_default_is_the_papers_for_the_models_kind(arch, ratio):
    shape = (3, 32, 32) if arch == "conv" else (1, 8, 8)
    module = module_class("van")("van", depth=10 if arch == "conv" else 2, arch=arch, input_shape=shape)
    scheduler = module.method_callbacks()[0]
    scheduler.setup(None, module, "fit")
    assert scheduler.lambda_lr_ratio == ratio and scheduler.gates


def test_summary_and_state_dict_change_nothing():
    module = module_class("van")("van", depth=2, arch="mlp", input_shape=(1, 8, 8))
    scheduler = AlphaScheduler()
    scheduler.setup(None, module, "fit")
    before = dict(vars(scheduler))
    scheduler.summary()
    scheduler.state_dict()
    assert vars(scheduler) == before
