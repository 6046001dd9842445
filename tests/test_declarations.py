"""Facts declared once and everything derived from them: train.py argument lists from option values
(``schema.to_argv``), the sweep's variants as option mappings, the run-folder record, and the callbacks'
overview scalars and images. No training (``pytest -m fast``)."""
import ast
import json
import re
from pathlib import Path

import pytest

from deepplain.callbacks import DIAGNOSTICS, AlphaScheduler, MaxNormConstraint, check_int, check_number
from deepplain.callbacks.tags import OVERVIEW, OverviewScalar, overview_charts, overview_values
from deepplain.cli import build_parser, parse_options
from deepplain.config import merge
from deepplain.errors import ConfigError
from deepplain.registry import families_taking, get_family, model_names
from deepplain.rundir import CHECKPOINT_FOLDER, LAST_CHECKPOINT, RunFolder, SweepFolder
from deepplain.schema import (OPTIONS, flag, options_for, parse_count_or_fraction, parse_devices, parse_numbers,
                              spellings, to_argv)
from deepplain.sweep import Run, check_identities, grid, parse_variant

pytestmark = pytest.mark.fast

SAMPLE_BY_PARSER = {int: 3, float: 0.25, parse_numbers: [0.5, 0.75], parse_count_or_fraction: 0.5,
                    parse_devices: "0,1"}


def sample_value(name):
    """A value of option ``name`` other than its default, of the type its parser gives."""
    o = OPTIONS[name]
    if o.switch:
        return o.switch == "on"  # the value its flag sets
    if o.choices:
        return list(o.choices)[-1]
    return SAMPLE_BY_PARSER[o.parse] if o.parse is not None else "some-text"


# -- option values <-> train.py arguments ---------------------------------------------------------------
def test_to_argv_gives_back_every_options_value_through_train_pys_parser():
    values = {name: sample_value(name) for name, o in OPTIONS.items() if o.on_command_line}
    argv = to_argv(values)
    assert parse_options(argv, "test") == values
    assert argv[:2] == [flag(next(iter(values))), str(values[next(iter(values))])]  # in the mapping's order


@pytest.mark.parametrize("value", [1e-4, 0.1, 120 / 165, 1e-12, 3.0, 1234567.0])
def test_a_float_is_spelled_so_that_it_parses_back_exactly(value):
    assert parse_options(to_argv({"lr": value}), "test") == {"lr": value}


def test_switches_appear_only_with_the_value_their_flag_sets_and_none_is_left_out():
    assert to_argv({"nesterov": True, "progress": False, "verify_checksums": False}) == [
        "--nesterov", "--no-progress", "--skip-checksums"]
    assert to_argv({"nesterov": False, "progress": True, "lr": None}) == []
    assert spellings("phase_out") == ("--phase-out", "--phase-out-epochs") and flag("phase_out") == "--phase-out"
    with pytest.raises(KeyError, match="run_dir"):
        to_argv({"run_dir": "x"})  # set by the run itself, never a flag


def test_bad_flags_are_a_config_error_that_says_where_they_came_from():
    with pytest.raises(ConfigError, match=r"^in --variant bn: unrecognized arguments: --bogus$"):
        parse_variant("bn=--norm bn --bogus")
    with pytest.raises(ConfigError, match=r"^after --: argument --lr: invalid float value: 'x'$"):
        grid(["plain"], [3], [0], [], ["--lr", "x"])
    with pytest.raises(ConfigError, match=r"--depth in --variant deep would override what the sweep sets"):
        parse_variant("deep=--depth 9")


# -- the sweep's variants are option values ----------------------------------------------------------------
def test_the_same_settings_in_another_order_or_spelling_are_the_same_run(tmp_path):
    name, options = parse_variant("mix=--lr 1e-4 --norm bn --nesterov")
    assert (name, options) == ("mix", {"lr": 0.0001, "norm": "bn", "nesterov": True})
    run = grid(["plain"], [3], [0], [(name, options)], ["--milestones", "0.5,0.75"])[0]
    root = SweepFolder(tmp_path).run_root(run.run_id)
    root.mkdir(parents=True)
    recorded = ["--nesterov", "--norm", "bn", "--milestones", "0.50,.75", "--epochs", "2", "--dataset", "usps",
                "--seed", "0", "--depth", "3", "--model", "plain", "--lr", "0.0001"]
    (root / "run.json").write_text(json.dumps({"flags": recorded}))
    check_identities([run], tmp_path, "usps", 2)  # nothing changed: no error
    with pytest.raises(ConfigError, match=r"other settings \(--epochs 2 -> 3\)"):
        check_identities([run], tmp_path, "usps", 3)


def test_a_runs_flags_read_identity_first_and_the_grid_wins():
    run = Run("van", 10, 2, "x", {"lr": 0.1, "norm": "bn"})
    assert run.train_flags("mnist", 4) == ["--model", "van", "--depth", "10", "--seed", "2", "--dataset", "mnist",
                                           "--epochs", "4", "--lr", "0.1", "--norm", "bn"]
    assert Run("van", 10, 2, options={"depth": 99}).train_options("mnist", 4)["depth"] == 10


# -- the run-folder record -------------------------------------------------------------------------------
def test_the_run_folder_record_and_the_folder_of_a_checkpoint(tmp_path):
    run = RunFolder(tmp_path / "runs" / "x" / "version_0")
    assert run.last_checkpoint == run.path / CHECKPOINT_FOLDER / LAST_CHECKPOINT
    assert RunFolder.of_checkpoint(run.last_checkpoint) == run
    assert RunFolder.of_checkpoint(run.path / "hpc_ckpt_3.ckpt") == run  # SLURM's requeue checkpoint
    assert (run.config.name, run.summary.name) == ("config.json", "summary.json")
    sweep = SweepFolder(tmp_path)
    assert sweep.run_root("plain-d3-s0") == tmp_path / "runs" / "plain-d3-s0" and sweep.results.name == "results.csv"


# -- the overview section --------------------------------------------------------------------------------
DECLARING = [*DIAGNOSTICS.values(), AlphaScheduler, MaxNormConstraint]
MAKE = {AlphaScheduler: lambda: AlphaScheduler(mode="linear"), MaxNormConstraint: lambda: MaxNormConstraint(3.0)}


@pytest.mark.parametrize("cls", DECLARING, ids=lambda c: c.__name__)
def test_each_overview_scalar_is_drawn_by_its_chart_and_each_overview_image_is_drawn(cls):
    charts = overview_charts(cls.overview_scalars)
    for scalar in cls.overview_scalars:  # Custom Scalars keeps the tags its regex matches (re.match)
        assert scalar.tag == f"{OVERVIEW}/{scalar.name}" and re.match(charts[scalar.chart], scalar.tag)
        # a second instance of the class logs "<tag>#2": its chart draws it too, unless anchored to one tag
        assert bool(re.match(charts[scalar.chart], scalar.tag + "#2")) is not scalar.anchored
    if getattr(cls, "overview_images", None):
        specs = MAKE.get(cls, cls)().publisher.specs
        assert {stat for stats in cls.overview_images.values() for stat in stats} <= set(specs)


def test_overview_charts_group_scalars_by_title_in_their_order():
    scalars = (OverviewScalar("a", "one"), OverviewScalar("b", "two"), OverviewScalar("c", "one"),
               OverviewScalar("v", "three", anchored=True))
    assert overview_charts(scalars) == {"one": "overview/(a|c)", "two": "overview/b", "three": "^overview/v$"}
    assert overview_values(scalars, {"a": 1, "c": 2, "other": 3}) == {"overview/a": 1, "overview/c": 2}


def test_every_diagnostic_section_is_its_prefix():
    assert all(cls.prefix == name for name, cls in DIAGNOSTICS.items() if hasattr(cls, "prefix"))
    assert {c.prefix for c in DECLARING if hasattr(c, "prefix")} >= {"saturation", "condition", "grad_flow", "alpha",
                                                                       "max_norm"}


# -- messages name real flags ------------------------------------------------------------------------------
def test_every_flag_a_message_names_is_one_train_py_or_a_tool_declares():
    """Messages spell flags for the user to type ("--nesterov needs --optimizer sgd"): a renamed flag must not
    leave one behind. Scans the code's string constants (docstrings left out)."""
    root = Path(__file__).resolve().parents[1]
    files = [p for folder in ("deepplain", "callbacks", "datamodules") for p in (root / folder).rglob("*.py")]
    known = {s for action in build_parser()._actions for s in action.option_strings}
    named, declared = [], set()
    for path in files + [root / "train.py"]:
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                declared |= {a.value for a in node.args if isinstance(a, ast.Constant)}
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                named += [(f, f"{path.relative_to(root)}:{node.lineno}")
                          for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value)]
    assert len(named) > 50  # the scan sees the messages
    assert [(f, where) for f, where in named if f not in known | declared] == []


# -- which options apply to which family: the family records' one rule -------------------------------------
def test_the_families_that_take_an_option_are_read_from_their_builders_and_modules():
    assert families_taking("cardinality") == ("resnext",) and families_taking("gate_bias") == ("highway",)
    assert families_taking("alpha_mode") == ("van",)  # VANModule's own keyword
    assert families_taking("lr") is None and families_taking("width") is None  # every family's
    assert set(families_taking("activation")) == {n for n in model_names() if any(
        "activation" in form.options() for form in get_family(n).forms.values())}
    with pytest.raises(ConfigError, match="^--gate-bias applies to --model highway only, got --model plain$"):
        merge({"model": "plain", "dataset": "usps", "gate_bias": 1.0})
    assert "norm" not in options_for(merge({"model": "van", "dataset": "usps"}), "model")


# -- the callbacks' argument checks ------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda: check_int("n", 0), "^n must be a positive integer, got 0$"),
    (lambda: check_int("n", True), "^n must be a positive integer, got True$"),
    (lambda: check_int("n", 1.0, allow_none=True), "^n must be a positive integer or None, got 1.0$"),
    (lambda: check_int("rows", 1, low=2), "^rows must be an integer >= 2, got 1$"),
    (lambda: check_number("share", 0, 0, 1, low_open=True), r"^share must be a number in \(0, 1\], got 0$"),
    (lambda: check_number("x", float("nan"), 0), r"^x must be a number in \[0, inf\), got nan$"),
    (lambda: check_number("r", 1, 0, 1, high_open=True, what="in (0, 1)"), r"^r must be in \(0, 1\), got 1$"),
])
def test_argument_checks_name_the_argument_in_one_line(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_argument_checks_pass_good_values_through():
    assert check_int("n", None, allow_none=True) is None and check_int("n", 0, low=0) == 0
    assert check_number("share", 1, 0, 1, low_open=True) == 1.0 and check_number("x", None, allow_none=True) is None
