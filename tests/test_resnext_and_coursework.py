"""ResNeXt, the 164-layer plain net (a ResNet without its skips), the coursework report's VGG08/VGG38 with and
without BN and residual connections, and the comparisons that train them (``deepplain.comparisons``)."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deepplain import ConfigError, build_model, count_parameters
from deepplain.comparisons import (COURSEWORK, SKIPS, coursework_runs, coursework_table, read_samples, skips_runs,
                                   skips_table)
from deepplain.config import merge
from deepplain.models.coursework import CourseworkBlock
from deepplain.models.residual import ResidualBlock
from deepplain.presets import PRESETS, get_preset
from deepplain.training import make_module

CIFAR = dict(arch="conv", input_shape=(3, 32, 32))


# -- ResNeXt -------------------------------------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize("cardinality,millions", [(8, 34.4), (16, 68.1)])
def test_resnext29_parameter_counts_match_the_paper(cardinality, millions):
    # Xie et al., Table 7 (CIFAR-10): ResNeXt-29 8x64d 34.4M, 16x64d 68.1M parameters.
    with torch.device("meta"):
        model = build_model("resnext", 29, **CIFAR, num_classes=10, cardinality=cardinality, bottleneck_width=64)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.002)  # 34.42M and 68.15M


@pytest.mark.fast
def test_resnext_with_one_group_of_16_is_our_resnet164_layer_for_layer():
    resnext = build_model("resnext", 164, **CIFAR, num_classes=10, width=1, cardinality=1, bottleneck_width=16)
    resnet = build_model("resnet", 164, **CIFAR, num_classes=10)
    shapes = {name: tuple(t.shape) for name, t in resnet.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in resnext.state_dict().items()} == shapes
    assert count_parameters(resnext) == count_parameters(resnet) == 1_703_258  # the 1.70M of He et al.


@pytest.mark.fast
def test_resnext_blocks_split_the_3x3_conv_into_cardinality_groups_doubling_per_stage():
    model = build_model("resnext", 20, **CIFAR, num_classes=10, width=1, cardinality=4, bottleneck_width=2)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups > 1]
    assert len(grouped) == 6 and {m.groups for m in grouped} == {4}  # 2 blocks in each of 3 stages
    assert [m.in_channels for m in grouped] == [8, 8, 16, 16, 32, 32]  # 4 x 2, then doubling
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.fast
def test_resnext_depth_and_option_errors():
    with pytest.raises(ConfigError, match=r"resnext conv depth must be 9n\+2 .*got 30"):
        build_model("resnext", 30, **CIFAR, num_classes=10)
    with pytest.raises(ConfigError, match="resnext has no 'mlp' form; valid: conv"):
        build_model("resnext", 29, arch="mlp", num_classes=10)
    with pytest.raises(ConfigError, match="--cardinality applies to --model resnext only, got --model resnet"):
        merge({"model": "resnet", "dataset": "cifar10", "cardinality": 4})


@pytest.mark.fast
def test_resnext_on_mnist_takes_its_only_form_and_trains_a_step():
    config = merge({"model": "resnext", "depth": 11, "dataset": "mnist", "width": 1, "cardinality": 2,
                    "bottleneck_width": 4})
    assert config.arch == "conv"
    module = make_module(config, (1, 28, 28), 10)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    before = nn.functional.cross_entropy(module(x), y)
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
    assert nn.functional.cross_entropy(module(x), y) < before


# -- the plain net without skips -----------------------------------------------------------------------
@pytest.mark.fast
def test_plain_layout_resnet_is_the_resnet_chain_without_skips():
    torch.manual_seed(3)
    resnet = build_model("resnet", 29, **CIFAR, num_classes=10)  # 29: bottleneck blocks
    torch.manual_seed(3)  # the same draws: the plain net is built from a ResNet and keeps its layers
    plain = build_model("plain", 29, **CIFAR, num_classes=10, layout="resnet", init="he-normal")
    projections = sum(b.shortcut.weight.numel() for b in resnet.blocks if isinstance(b.shortcut, nn.Conv2d))
    assert count_parameters(plain) == count_parameters(resnet) - projections
    resnet.eval(), plain.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        chained = resnet.head(torch.nn.Sequential(*[b.residual for b in resnet.blocks])(resnet.stem(x)))
        assert torch.equal(plain(x), chained)
        assert not torch.allclose(resnet(x), chained)  # the skips mattered
    assert not any(isinstance(m, ResidualBlock) for m in plain.modules())


@pytest.mark.fast
def test_plain_layout_resnet_follows_the_resnet_depth_rules_and_refuses_other_layers():
    with pytest.raises(ConfigError, match=r"plain conv depth must be 6n\+2 .* or 9n\+2 .*got 165"):
        build_model("plain", 165, **CIFAR, num_classes=10, layout="resnet")
    with pytest.raises(ConfigError, match="layout resnet is a pre-activation ResNet's layers"):
        build_model("plain", 20, **CIFAR, num_classes=10, layout="resnet", norm="none")


# -- the coursework's VGG ------------------------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize("preset,paper", [("vgg08-cifar100", 60_000), ("vgg38-cifar100", 336_000),
                                          ("vgg38-bn-cifar100", 339_000), ("vgg38-rc-cifar100", 336_000),
                                          ("vgg38-bn-rc-cifar100", 339_000)])
def test_coursework_presets_have_the_reports_parameter_counts(preset, paper):
    # Table 1 of the report, rounded to thousands; ours with BN is 338.3K (64 per BN layer, 37 of them).
    config = merge(get_preset(preset))
    model = make_module(config, (3, 32, 32), 100).model
    assert abs(count_parameters(model) - paper) < 1_000
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == config.depth and {m.out_channels for m in convs} == {32}
    assert all(m.bias is None for m in convs)


@pytest.mark.fast
def test_coursework_residual_block_adds_its_input_before_the_second_activation():
    torch.manual_seed(0)
    block = CourseworkBlock(4, "none", "lrelu", 0.01, reduce=False, residual=True)
    x = torch.randn(2, 4, 8, 8)
    act = nn.LeakyReLU(0.01)
    conv1, conv2 = block.unit1.conv, block.unit2.conv
    expected = act(nn.functional.conv2d(act(nn.functional.conv2d(x, conv1.weight, padding=1)), conv2.weight,
                                        padding=1) + x)
    assert torch.allclose(block(x), expected, atol=1e-6)
    reducing = CourseworkBlock(4, "none", "lrelu", 0.01, reduce=True, residual=True)
    assert reducing(x).shape == (2, 4, 4, 4) and not reducing.residual  # a reduction block keeps no skip


@pytest.mark.fast
def test_coursework_rc_and_plain_differ_only_in_the_skips():
    torch.manual_seed(1)
    plain = build_model("plain", 14, **CIFAR, num_classes=100, layout="coursework", norm="none", init="default")
    torch.manual_seed(1)
    rc = build_model("resnet", 14, **CIFAR, num_classes=100, layout="coursework", norm="none", init="default")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), rc.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain(x), rc(x))
    with pytest.raises(ConfigError, match="layout coursework has its own blocks"):
        build_model("resnet", 14, **CIFAR, num_classes=10, layout="coursework", block="basic")
    with pytest.raises(ConfigError, match="layout preact is BN \\+ ReLU"):
        build_model("resnet", 20, **CIFAR, num_classes=10, norm="none")


@pytest.mark.fast
def test_vgg38_vanishes_at_pytorchs_default_init_and_bn_or_skips_bring_the_gradient_back():
    """The report's Fig. 3 against Figs. 5 and its RC row: at initialisation the first conv's gradient of
    VGG38 is orders of magnitude below VGG38 + BN's and + RC's."""
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 100

    def first_grad(preset):
        torch.manual_seed(0)
        model = make_module(merge(get_preset(preset)), (3, 32, 32), 100).model
        nn.functional.cross_entropy(model(x), y).backward()
        return model.entry.unit.conv.weight.grad.abs().mean().item()
    broken = first_grad("vgg38-cifar100")
    assert broken < 1e-3 * first_grad("vgg38-bn-cifar100")
    assert broken < 1e-3 * first_grad("vgg38-rc-cifar100")


# -- the comparisons -----------------------------------------------------------------------------------
@pytest.mark.fast
def test_every_coursework_row_is_a_preset_and_every_row_differs():
    runs = coursework_runs({})
    assert list(runs) == list(COURSEWORK)
    assert all(PRESETS[preset] for preset, *_ in COURSEWORK.values())
    assert len({run.run_id for run in runs.values()}) == len({tuple(run.flags) for run in runs.values()}) == 7


def write_run(folder, rows, summary_parameters=1000):
    folder.mkdir(parents=True)
    with (folder / "diagnostics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "callback", "statistic", "layer", "value"])
        writer.writerows(rows)
    return {"run_dir": str(folder), "status": "completed", "train_acc": 0.5, "val_acc": 0.25, "test_acc": 0.125,
            "parameters": summary_parameters}


@pytest.mark.fast
def test_skips_table_counts_infinite_kappas_at_the_first_and_last_samples(tmp_path):
    rows = {}
    for name in SKIPS:
        rows[name] = write_run(tmp_path / name, [
            (0, "condition", "kappa", "a", 10.0), (0, "condition", "kappa", "b", "inf"),
            (0, "grad_flow", "norm", "a", 1e-9), (0, "grad_flow", "norm", "b", 2.0),
            (8, "condition", "kappa", "a", "inf"), (8, "condition", "kappa", "b", "inf"),
            (8, "saturation", "kappa", "a", 5.0)], 2_038_714)
    assert read_samples(tmp_path / "PlainNet", "condition", "kappa")[0] == {"a": 10.0, "b": float("inf")}
    rows["ResNet"] = write_run(tmp_path / "diverged", [(0, "condition", "kappa", "a", 100.0)])
    rows["ResNet"].update(status="diverged", global_step=11, train_acc=None)
    table = skips_table(rows).splitlines()
    assert table[2] == ("| PlainNet | 2,039K | 50.00 | 25.00 | 12.50 | 1 of 2 / 2 of 2 | 1.0 / nan | 1e-09 / 2 |")
    assert table[3] == "| ResNet | 1K | - (diverged at step 11) | 25.00 | 12.50 | 0 of 1 (step 0 only) | 2.0 | - |"


@pytest.mark.fast
def test_coursework_table_puts_the_reports_numbers_beside_ours(tmp_path):
    rows = {name: write_run(tmp_path / str(i), []) for i, name in enumerate(COURSEWORK)}
    rows["VGG38"]["status"] = "diverged"
    table = coursework_table(rows).splitlines()
    assert table[2] == "| VGG08 | 1K / 60K | 50.00 | 25.00 | 12.50 | 51.59 | 46.84 |"
    assert table[3].startswith("| VGG38 | 1K / 336K | 50.00 (diverged) |")


@pytest.mark.parametrize("argv,message", [
    (["coursework", "--dataset", "coil20", "--epochs", "2", "--out", "x", "--", "--lr", "0.1"],
     "--lr after -- would change what the comparison compares"),
    (["skips", "--dataset", "mnist", "--epochs", "2", "--out", "x", "--", "--depth", "20"],
     "--depth after -- would override what the sweep sets"),
    (["skips", "--dataset", "mnist", "--depth", "30", "--epochs", "2", "--out", "x"],
     r"depth must be .*9n\+2"),
])
def test_comparisons_refuse_bad_commands_in_one_line_before_writing(tmp_path, argv, message):
    done = subprocess.run([sys.executable, "-m", "deepplain.comparisons", *argv], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "x").exists()


def test_the_gpu_script_lists_the_full_cifar_comparisons_ready_to_run():
    """benchmarks/gpu_experiments.sh with DRY_RUN=1 checks every run as train.py would and trains nothing."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_experiments.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * len(SKIPS) + len(COURSEWORK)
    assert sum("--dataset cifar100 --epochs 100 --preset vgg" in line for line in lines) == len(COURSEWORK)
    assert sum("--depth 164" in line and "--dataset cifar10 " in line for line in lines) == len(SKIPS)


@pytest.mark.fast
def test_a_run_without_a_folder_reads_as_no_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "elsewhere", [(0, "condition", "kappa", "a", 1.0)])
    (tmp_path / "diagnostics.csv").write_text((tmp_path / "elsewhere" / "diagnostics.csv").read_text())
    assert read_samples(None, "condition", "kappa") == {} and read_samples("", "condition", "kappa") == {}


def test_a_comparison_into_a_folder_with_other_settings_stops_in_one_line_and_keeps_it(tmp_path):
    """The same --out with another budget: the sweep runner's own refusal, as one line and exit 2, nothing lost."""
    out = tmp_path / "skips"
    run = skips_runs(11, {})["ResNet"]
    folder = out / "runs" / run.run_id
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"flags": run.train_flags("mnist", 3)}))
    before = (folder / "run.json").read_text()
    done = subprocess.run([sys.executable, "-m", "deepplain.comparisons", "skips", "--dataset", "mnist", "--depth",
                           "11", "--epochs", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ") and (folder / "run.json").read_text() == before
