"""The callbacks in someone else's project: one ``deepplain`` namespace, no side effects, LightningCLI, and modules
built in ways deepplain's own are not (compiled, manual optimization, no layers)."""
import ast
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import deepplain.callbacks as dc
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import fit, read_events
from deepplain.callbacks import (
    ActivationSaturationMonitor,
    AlphaScheduler,
    ConditionNumberProbe,
    GradientFlowMonitor,
    MaxNormConstraint,
    probing,  # noqa: F401  (its docstring example is tested)
)
from torch import nn

from tests.foreign import ForeignMLP, loaders

REPO = Path(__file__).resolve().parents[1]


def run_script(folder: Path, script: str, *args, timeout=300):
    (folder / "script.py").write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, "script.py", *args], cwd=folder, capture_output=True, text=True,
                          timeout=timeout)


PROJECT_SCRIPT = """
import json, lightning as L, torch, torch.nn.functional as F
from torch import nn
from callbacks import CountBatches            # the project's own callbacks.py
from datamodules import make_loader           # and its own datamodules.py
from deepplain.callbacks import (ActivationSaturationMonitor, AlphaScheduler, ConditionNumberProbe,
                                 GradientFlowMonitor, MaxNormConstraint)

class Gate(nn.Module):  # the VAN gate protocol, written from the README
    def __init__(self, n):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(n))
        self.register_buffer("lagrange_lambda", torch.full((n,), -1.0))
    def forward(self, x):
        return (1 - self.alpha) * x

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.inp, self.block, self.gate, self.out = nn.Linear(8, 16), nn.Sequential(nn.ReLU(), nn.Linear(16, 16)), \\
            Gate(16), nn.Linear(16, 3)
    def forward(self, x):
        h = self.inp(x)
        return self.out(self.block(h) + self.gate(h))
    def training_step(self, batch, i):
        return F.cross_entropy(self(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

counter = CountBatches()
callbacks = [counter, ActivationSaturationMonitor(every_n_steps=2), ConditionNumberProbe(every_n_steps=2),
             GradientFlowMonitor(every_n_steps=2), MaxNormConstraint(2.0), AlphaScheduler(phase_out=0.5)]
trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=callbacks)
net = Net()
trainer.fit(net, make_loader())
print(json.dumps({"batches": counter.n, "alpha_one": bool((net.gate.alpha == 1).all()),
                  "saturation": sorted(callbacks[1].last_stats), "condition": len(callbacks[2].last_stats),
                  "grad": len(callbacks[3].last_stats)}))
"""


def test_a_project_with_its_own_callbacks_and_datamodules_modules(tmp_path):
    (tmp_path / "callbacks.py").write_text(
        "import lightning as L\nclass CountBatches(L.Callback):\n    n = 0\n"
        "    def on_train_batch_end(self, *args):\n        CountBatches.n += 1\n")
    (tmp_path / "datamodules.py").write_text(
        "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\n"
        "def make_loader():\n    g = torch.Generator().manual_seed(0)\n"
        "    return DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)),"
        " batch_size=16)\n")
    proc = run_script(tmp_path, PROJECT_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"batches": 12, "alpha_one": True, "saturation": ["block.0"], "condition": 1, "grad": 3}


def test_only_deepplain_is_installed_at_the_top_level(tmp_path):
    """Outside the repository, the installed package offers `deepplain` and nothing else at the top level."""
    proc = subprocess.run([sys.executable, "-c", "import importlib.util as u, deepplain.callbacks as c, "
                           "deepplain.datamodules as d; print([u.find_spec(n) is None for n in "
                           "('callbacks', 'datamodules', 'train')], c.__name__, d.__name__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[True,", "True,", "True]", "deepplain.callbacks", "deepplain.datamodules"]


@pytest.mark.fast
def test_callbacks_depend_on_nothing_of_deepplain():
    """Every import in deepplain/callbacks is relative to the package itself or a third-party library."""
    folder = Path(dc.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from outside deepplain.callbacks"
                assert node.level == 1 or not (node.module or "").startswith("deepplain"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("deepplain") for a in node.names), path.name


def test_two_saturation_monitors_on_different_layers_log_and_resume_separately(tmp_path):
    first = ActivationSaturationMonitor(every_n_steps=2, include=["body.1", "body.3"], max_overhead=None,
                                        per_layer_scalars=True)
    second = ActivationSaturationMonitor(every_n_steps=3, include=["body.5", "body.7"], max_overhead=None,
                                         per_layer_scalars=True)
    assert first.state_key != second.state_key
    train, val = loaders()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", callbacks=[first, second], default_root_dir=tmp_path,
                        logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb"),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(ForeignMLP(), train, val)
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Scalars("saturation/train/mean_abs/body.1")] == [0, 2, 4, 5]
    assert [e.step for e in acc.Scalars("saturation#2/train/mean_abs/body.7")] == [0, 3, 5]
    assert "saturation#2/train/mean_abs/body.5" in acc.Tags()["scalars"] and list(first.last_stats) == ["body.1",
                                                                                                        "body.3"]
    # the second monitor's summaries, images and overview do not overwrite the first's
    assert [e.step for e in acc.Scalars("saturation#2/depth_max/max_abs")] == [0, 3, 5]
    assert "saturation#2/depth_time/max_abs" in acc.Tags()["images"] and "overview/layers_dead#2" in acc.Tags()[
        "scalars"]
    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert {first.state_key, second.state_key} <= set(saved)
    again = [ActivationSaturationMonitor(every_n_steps=2, include=["body.1", "body.3"], max_overhead=None),
             ActivationSaturationMonitor(every_n_steps=3, include=["body.5", "body.7"], max_overhead=None)]
    resumed = L.Trainer(max_steps=8, accelerator="cpu", callbacks=again, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    resumed.fit(ForeignMLP(), train, ckpt_path=path)
    # two more steps: both are due at step 6 and at the new last step 7
    assert again[0].samples_taken == first.samples_taken + 2 and again[1].samples_taken == second.samples_taken + 2


CLI_SCRIPT = """
import json, sys, lightning as L, torch, torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

class Tiny(L.LightningModule):
    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 3))
    def forward(self, x):
        return self.net(x)
    def training_step(self, batch, i):
        return F.cross_entropy(self(batch[0]), batch[1])
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)),
                          batch_size=16)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def on_fit_end(self):
        out = [[type(cb).__name__, getattr(cb, "schedule", None) and cb.schedule.every_n_steps,
                getattr(cb, "max_norm", None), getattr(cb, "samples_taken", None)] for cb in self.trainer.callbacks
               if type(cb).__module__.startswith("deepplain")]
        open("callbacks.json", "w").write(json.dumps(out))

LightningCLI(Tiny)
"""


def test_lightning_cli_adds_the_callbacks_from_the_command_line(tmp_path):
    proc = run_script(tmp_path, CLI_SCRIPT, "fit", "--trainer.max_steps=4", "--trainer.enable_progress_bar=false",
                      "--trainer.default_root_dir=.", "--trainer.accelerator=cpu",
                      "--trainer.callbacks+=deepplain.callbacks.ActivationSaturationMonitor",
                      "--trainer.callbacks.every_n_steps=50",
                      "--trainer.callbacks+=deepplain.callbacks.ConditionNumberProbe",
                      "--trainer.callbacks.weight_norms=[inf,2]",
                      "--trainer.callbacks+=deepplain.callbacks.MaxNormConstraint", "--trainer.callbacks.max_norm=2.5",
                      "--trainer.callbacks+=deepplain.callbacks.GradientFlowMonitor")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "callbacks.json").read_text())
    assert [row[:3] for row in got] == [["ActivationSaturationMonitor", 50, None], ["ConditionNumberProbe", None, None],
                                        ["MaxNormConstraint", None, 2.5], ["GradientFlowMonitor", None, None]]
    assert got[0][3] == 2 and got[1][3] >= 2 and got[3][3] >= 2  # every_n_steps=50: step 0 and the last step


def diagnostics():
    return [ActivationSaturationMonitor(every_n_steps=2, max_overhead=None),
            ConditionNumberProbe(every_n_steps=2, max_overhead=None),
            GradientFlowMonitor(every_n_steps=2, max_overhead=None), MaxNormConstraint(2.0)]


def test_a_compiled_module(tmp_path):
    torch.manual_seed(0)
    cbs = diagnostics()
    fit(torch.compile(ForeignMLP(), backend="eager"), cbs, tmp_path, steps=4)
    assert list(cbs[0].last_stats) == ["body.1", "body.3", "body.5", "body.7"]
    assert cbs[1].samples_taken == 3 and cbs[2].samples_taken == 3


class ManualMLP(ForeignMLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        opt.step()
        return loss


def test_a_manual_optimization_module(tmp_path):
    torch.manual_seed(0)
    cbs = diagnostics()
    module = ManualMLP()
    fit(module, cbs, tmp_path, steps=4)
    assert cbs[0].samples_taken == 3 and cbs[2].samples_taken == 3 and len(cbs[2].last_stats) == 5
    assert all((m.weight.norm(dim=1) <= 2.0 + 1e-5).all() for m in module.modules() if isinstance(m, nn.Linear)
               and m is not module.head)


class NoLayers(ForeignMLP):
    """A model written with torch.nn.functional only: nothing to hook."""

    def __init__(self):
        super().__init__()
        del self.body, self.head
        self.w = nn.Parameter(torch.randn(20, 4) * 0.1)

    def forward(self, x):
        return F.relu(x) @ self.w


@pytest.mark.parametrize("callback,message", [
    (ActivationSaturationMonitor(), "ActivationSaturationMonitor found no layers to watch in NoLayers"),
    (ConditionNumberProbe(), "ConditionNumberProbe found no hidden layers in NoLayers"),
    (GradientFlowMonitor(), "GradientFlowMonitor found no Linear, Conv, recurrent, attention or embedding layer "
                            "in NoLayers"),
    (MaxNormConstraint(), "MaxNormConstraint found no Linear or Conv layer to constrain in NoLayers"),
    (AlphaScheduler(), "AlphaScheduler found no VAN skip gates in NoLayers"),
])
def test_a_module_without_layers_gets_one_clear_error(callback, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        fit(NoLayers(), [callback], tmp_path, steps=1, logger=False)


BACKEND_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import matplotlib
matplotlib.use("svg")
import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor
from tests.foreign import ForeignMLP, loaders
cbs = [ActivationSaturationMonitor(every_n_steps=1), ConditionNumberProbe(every_n_steps=1),
       GradientFlowMonitor(every_n_steps=1)]
L.Trainer(max_steps=3, logger=TensorBoardLogger("tb"), callbacks=cbs, enable_progress_bar=False,
          enable_checkpointing=False, limit_val_batches=1).fit(ForeignMLP(), *loaders())
print(matplotlib.get_backend(), matplotlib.rcParams["backend"])
"""


class NoForward(ForeignMLP):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.body(batch[0])), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.head(self.body(batch[0])), batch[1]))

    forward = L.LightningModule.forward


def test_a_module_without_forward_is_watched_on_its_training_batches(tmp_path, caplog):
    """No forward(): both probing callbacks capture the training step's own forward, say so once, and log."""
    saturation = ActivationSaturationMonitor(every_n_steps=2, max_overhead=None)
    condition = ConditionNumberProbe(every_n_steps=2, max_overhead=None, per_layer_scalars=True)
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        fit(NoForward(), [saturation, condition], tmp_path, steps=4)
    said = [r.getMessage() for r in caplog.records if "has no forward()" in r.getMessage()]
    assert len(said) == 2 and all("training-batch statistics" in m for m in said)
    assert saturation.probe is None and saturation.probes_taken == 0 and saturation.samples_taken == 3
    assert not saturation.publisher.records.get("probe")  # no probe, no probe images or charts
    assert condition.probe_mode == "training" and condition.sampled_steps == [0, 2, 3]
    assert list(condition.last_stats) == ["body.1", "body.3", "body.5", "body.7"]
    tags = read_events(tmp_path).Tags()["scalars"]
    assert "condition/train/log10_kappa/body.1" in tags and "condition/log10_kappa/body.1" not in tags
    assert "condition/train/weight_log10_kappa_inf/body.0" in tags
    assert "condition/train/depth_time/log10_kappa" in read_events(tmp_path).Tags()["images"]
    assert all(not m._forward_hooks for m in NoForward().modules())


def test_a_module_without_forward_probed_through_probe_fn(tmp_path, caplog):
    probe_fn = lambda module, x: module.head(module.body(x))  # noqa: E731
    saturation = ActivationSaturationMonitor(every_n_steps=2, probe_fn=probe_fn, per_layer_scalars=True)
    condition = ConditionNumberProbe(every_n_steps=2, probe_fn=probe_fn, per_layer_scalars=True)
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        fit(NoForward(), [saturation, condition], tmp_path, steps=4)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deepplain: probe batch")]
    assert said == ["deepplain: probe batch of 128 samples from a separate pass over the training data, used by "
                    "ActivationSaturationMonitor through probe_fn(pl_module, inputs), ConditionNumberProbe through "
                    "probe_fn(pl_module, inputs)"]
    assert saturation.probes_taken >= 2 and condition.probe_mode == "probe_fn"
    tags = read_events(tmp_path).Tags()["scalars"]
    assert "condition/log10_kappa/body.1" in tags and "saturation/probe/mean_abs/body.1" in tags


def test_the_users_matplotlib_backend_is_unchanged(tmp_path):
    proc = run_script(tmp_path, BACKEND_SCRIPT.format(repo=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "svg svg"
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))  # figures were drawn


@pytest.mark.fast
@pytest.mark.parametrize("obj", [ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor,
                                 MaxNormConstraint, AlphaScheduler, probing], ids=lambda o: o.__name__)
def test_docstring_examples_run(obj):
    doc = inspect.getdoc(obj)
    assert "Example::" in doc
    example = textwrap.dedent(doc.split("Example::", 1)[1]).strip("\n")
    exec(compile(example, f"<{obj.__name__} example>", "exec"), {})


@pytest.mark.fast
@pytest.mark.parametrize("cls", [ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor,
                                 MaxNormConstraint, AlphaScheduler])
def test_init_arguments_are_typed_for_lightning_cli(cls):
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name != "self":
            assert parameter.annotation is not inspect.Parameter.empty, f"{cls.__name__}({name}) has no type"
