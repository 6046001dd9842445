"""The diagnostics on the models people really have: torchvision builders, torch.nn recurrent and transformer
layers, Lightning's own demos, modules without forward(), lazy layers with dropout, tuple and dict outputs,
manual optimization. Each runs in 32-true and bf16-mixed; every callback must log something, and the run must be
the same seeded run without the callbacks (tests/observation.py: bit for bit where this machine reproduces a run)."""
import importlib.util
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from deepplain.callbacks import (
    ActivationSaturationMonitor,
    ConditionNumberProbe,
    GradientFlowMonitor,
)
from lightning.pytorch.demos import LightningLSTM, LightningTransformer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, TensorDataset

from tests.foreign import ForeignMLP, loaders
from tests.observation import RunTrace, assert_observed_only, trace_after_fit

STEPS = 3


class RecordingLogger(Logger):
    """Keeps every logged metric name in memory: what a logger of the user's would receive."""

    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()

    name, version = "memory", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.tags.update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


# -- models --------------------------------------------------------------------------------------------
class Classifier(L.LightningModule):
    """A LightningModule around any net that maps inputs to logits (``self.net(x)``; forward defined)."""

    def __init__(self, net: nn.Module, lr: float = 0.05):
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def logits(self, x):
        return self(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.logits(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LSTMNet(nn.Module):
    """nn.LSTM(16, 24, num_layers=2) + Linear: the LSTM is the only hidden layer type."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(16, 24, num_layers=2, batch_first=True), nn.Linear(24, 4)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class PackedGRUNet(nn.Module):
    """A bidirectional GRU on packed sequences of different lengths, time-first."""

    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(16, 20, bidirectional=True), nn.Linear(40, 4)

    def forward(self, x):
        lengths = torch.arange(x.shape[0]) % 4 + x.shape[1] - 3  # 9..12 of 12 steps
        packed = pack_padded_sequence(x.transpose(0, 1), lengths, enforce_sorted=False)
        _, h = self.gru(packed)
        return self.head(torch.cat([h[0], h[1]], dim=1))


class TimeFirstEncoder(nn.Module):
    """nn.TransformerEncoder with (time, batch, channels) tensors and a GELU MLP head on the tokens."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.1)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.mlp(self.encoder(x.transpose(0, 1))).mean(0))


class LazyDropout(nn.Module):
    """Lazy layers and dropout: a probe that initialised the lazy layers first would reorder the random stream."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Dropout(0.3), nn.LazyLinear(32), nn.ReLU(),
                                  nn.Dropout(0.3))
        self.head = nn.LazyLinear(4)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


class DictOutput(Classifier):
    """forward returns a dict, its net a tuple."""

    def __init__(self):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Tanh(), nn.Linear(32, 4)))

    def forward(self, x):
        return {"logits": self.net(x), "aux": (x.mean(), None)}

    def logits(self, x):
        return self(x)["logits"]


class NoForward(Classifier):
    """The common pattern: self.net(x) inside training_step, no forward()."""

    forward = L.LightningModule.forward

    def logits(self, x):
        return self.net(x)


class Manual(Classifier):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.cross_entropy(self(batch[0]).float(), batch[1])
        self.manual_backward(loss)
        opt.step()


class DemoTransformer(LightningTransformer):
    """Lightning's demo: forward(inputs, target) takes two tensors, so a probe of forward(x) cannot run."""

    def __init__(self):
        super().__init__(vocab_size=50)

    def prepare_data(self):  # the demo downloads WikiText-2; the test brings its own tokens
        pass


class DemoLSTM(LightningLSTM):
    """Lightning's demo LSTM language model: no forward(), a stateful hidden state, tuple outputs."""

    def __init__(self):
        super().__init__(vocab_size=50)
        self.model = type(self.model)(vocab_size=50, ninp=32, nhid=32, nlayers=2)

    def prepare_data(self):
        pass


def tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=4)


def data(kind: str, n: int = 48):
    g = torch.Generator().manual_seed(0)
    if kind == "image":  # 16 x 16: resnet18 and mobilenet still reach 1 x 1 at their last stage
        x = torch.randn(n, 3, 16, 16, generator=g)
    elif kind == "vit_image":
        x = torch.randn(n, 3, 32, 32, generator=g)
    elif kind == "small_image":
        x = torch.randn(n, 3, 8, 8, generator=g)
    elif kind == "sequence":
        x = torch.randn(n, 12, 16, generator=g)
    else:  # tokens: (inputs, next tokens)
        tokens = torch.randint(0, 50, (n, 13), generator=g)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8, shuffle=True,
                          generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (n,), generator=g)
    # shuffled with its own generator: the probe's pass over the data must not move it
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))


MODELS = {
    "resnet18": (lambda: Classifier(torchvision.models.resnet18(num_classes=4)), "image"),
    "mobilenet_v3_small": (lambda: Classifier(torchvision.models.mobilenet_v3_small(num_classes=4)), "image"),
    "vit": (lambda: Classifier(tiny_vit()), "vit_image"),
    "lstm": (lambda: Classifier(LSTMNet()), "sequence"),
    "gru_packed_bidirectional": (lambda: Classifier(PackedGRUNet()), "sequence"),
    "transformer_time_first": (lambda: Classifier(TimeFirstEncoder()), "sequence"),
    "lazy_dropout": (lambda: Classifier(LazyDropout()), "small_image"),
    "dict_output": (DictOutput, "small_image"),
    "no_forward_resnet18": (lambda: NoForward(torchvision.models.resnet18(num_classes=4)), "image"),
    "manual_optimization": (lambda: Manual(tiny_vit()), "vit_image"),
    "lightning_demo_transformer": (DemoTransformer, "tokens"),
    "lightning_demo_lstm": (DemoLSTM, "tokens"),
}


def diagnostics():
    # small probes and matrices keep the 24 pairs of runs fast; the defaults are tested elsewhere
    return [ActivationSaturationMonitor(every_n_steps=2, max_overhead=None, probe_size=16, per_layer_scalars=True),
            ConditionNumberProbe(every_n_steps=2, max_overhead=None, probe_size=16, max_rows=256,
                                 per_layer_scalars=True),
            GradientFlowMonitor(every_n_steps=2, max_overhead=None, per_layer_scalars=True)]


def train(name: str, precision: str, callbacks: list):
    """(module, logged tags, warning messages, trace) of a seeded 3-step fit (see tests/observation.py)."""
    make, kind = MODELS[name]
    torch.manual_seed(0)
    module = make()
    logger = RecordingLogger()
    trace = RunTrace()
    loader = data(kind)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, precision=precision,
                        callbacks=[trace, *callbacks], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    return module, logger.tags, [str(w.message) for w in caught], trace_after_fit(trace, module, [loader.generator])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_diagnostics_log_on_any_model_and_change_nothing(name, precision):
    """Every callback logs, and the run is the run without them: bit for bit where this machine reproduces a run,
    else the data order, random states and hooks exactly and the weights within two reference runs' spread
    (``tests/observation.py``; torch's bf16 convolutions are not reproducible on every CPU)."""
    try:
        reference = train(name, precision, [])[3]
    except RuntimeError as exc:  # torch's oneDNN LSTM/GRU kernels refuse bf16 autocast on some CPUs
        if precision == "bf16-mixed" and "primitive" in str(exc):
            pytest.skip(f"torch cannot train {name} in {precision} on this CPU, without any callback either: "
                        f"{str(exc).splitlines()[0][:120]}")
        raise
    cbs = diagnostics()
    _, tags, messages, trace = train(name, precision, cbs)
    for prefix in ("saturation/", "condition/", "grad_flow/"):
        assert any(t.startswith(prefix) for t in tags), (prefix, sorted(tags)[:20])
    for cb in cbs:
        assert cb.samples_taken >= 2 and cb.last_stats, type(cb).__name__
    assert_observed_only(reference, trace, rerun=lambda: train(name, precision, [])[3])
    if name == "lightning_demo_transformer":  # forward(inputs, target): the probe falls back, with one warning
        assert sum("the probe batch could not go through the model" in m for m in messages) == 2
        assert cbs[1].probe_mode == "training" and any(t.startswith("condition/train/log10_kappa/") for t in tags)


def test_watched_layers_of_recurrent_and_attention_models():
    """Recurrent and attention layers are watched by default, and a sequence has its channels as units."""
    cbs = diagnostics()
    train("lstm", "32-true", cbs)
    assert list(cbs[0].last_stats) == ["net.lstm"]
    probe_rows = cbs[1].max_rows
    assert probe_rows == 256 and cbs[1].last_stats["net.lstm"]["rank"] == 24  # 16 x 12 tokens >= 24 units
    cbs = diagnostics()
    train("transformer_time_first", "32-true", cbs)
    names = list(cbs[0].last_stats)
    assert names[:3] == ["net.encoder.layers.0.self_attn", "net.encoder.layers.0", "net.encoder.layers.1.self_attn"]
    assert "net.mlp.1" in names  # the GELU after a Linear: units last, like the Linear's
    assert cbs[1].last_stats["net.mlp.1"]["rank"] == 16


def test_demo_transformer_probed_through_probe_fn():
    cbs = [ConditionNumberProbe(every_n_steps=2, max_overhead=None, probe_size=16, per_layer_scalars=True,
                                probe_fn=lambda module, x: module(x, x))]
    _, tags, messages, _ = train("lightning_demo_transformer", "32-true", cbs)
    assert cbs[0].probe_mode == "probe_fn" and not any("could not go through" in m for m in messages)
    assert any(t.startswith("condition/log10_kappa/model.transformer.encoder.layers.0") for t in tags)


def test_a_probe_is_gathered_from_as_many_training_batches_as_the_widest_layer_needs(tmp_path):
    """A drop-in run on batches of 16 and layers of 200 units: the probe takes 400 samples from 25 batches, each
    layer's rank is numpy's rank of that layer on those samples (far above the 16 one batch could show), and
    training's data order and weights are those of a run without it."""

    def loader():
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(1000, 20, generator=g), torch.randint(0, 4, (1000,), generator=g))
        return DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))

    def run(callbacks):
        torch.manual_seed(0)
        module, data, trace = ForeignMLP(depth=3, width=200), loader(), RunTrace()
        L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[trace, *callbacks]).fit(module, data)
        return module, trace_after_fit(trace, module, [data.generator])

    probe = ConditionNumberProbe(every_n_steps=2, max_overhead=None)
    with_probe, watched = run([probe, ActivationSaturationMonitor(every_n_steps=2, max_overhead=None)])
    assert probe.probe.inputs.shape[0] == 400 and probe.probe.source == "a separate pass over the training data"
    with torch.no_grad():
        hidden, ranks = probe.probe.inputs, {}
        for index, layer in enumerate(with_probe.eval().body):
            hidden = layer(hidden)
            if isinstance(layer, nn.ReLU):
                ranks[f"body.{index}"] = int(np.linalg.matrix_rank(hidden.double().numpy()))
    assert {name: int(row["rank"]) for name, row in probe.last_stats.items()} == ranks
    assert min(ranks.values()) > 150 and math.isfinite(probe.last_stats["body.1"]["kappa"])
    assert_observed_only(run([])[1], watched, rerun=lambda: run([])[1])


def test_one_probe_batch_is_shared_and_saved_once(tmp_path):
    """All diagnostics together add at most one probe batch to a checkpoint."""

    def checkpoint_size(callbacks, path):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        loader = DataLoader(TensorDataset(torch.randn(512, 20, generator=g), torch.randint(0, 4, (512,), generator=g)),
                            batch_size=32)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(ForeignMLP(), loader)
        trainer.save_checkpoint(path)
        return path.stat().st_size

    cbs = [ActivationSaturationMonitor(every_n_steps=2, max_overhead=None),
           ConditionNumberProbe(every_n_steps=2, max_overhead=None), GradientFlowMonitor(every_n_steps=2)]
    with_all = checkpoint_size(cbs, tmp_path / "all.ckpt")
    without = checkpoint_size([], tmp_path / "none.ckpt")
    assert cbs[0].probe is cbs[1].probe and cbs[0].probe.inputs.shape == (256, 20)
    probe_bytes = cbs[0].probe.inputs.numel() * 4
    assert probe_bytes < with_all - without <= probe_bytes + 16_384
    saved = torch.load(tmp_path / "all.ckpt", weights_only=False)["callbacks"]
    assert saved[cbs[0].state_key]["probe"]["inputs"].shape == (256, 20)
    assert saved[cbs[1].state_key]["probe"] == {"shared": True}
    # a resumed run gets the same probe back
    again = [ActivationSaturationMonitor(every_n_steps=2, max_overhead=None),
             ConditionNumberProbe(every_n_steps=2, max_overhead=None)]
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(512, 20, generator=g), torch.randint(0, 4, (512,), generator=g)),
                        batch_size=32)
    L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=again).fit(ForeignMLP(), loader, ckpt_path=tmp_path / "all.ckpt")
    assert again[0].probe is again[1].probe and torch.equal(again[1].probe.inputs, cbs[0].probe.inputs)


@pytest.mark.parametrize("make,message", [
    (lambda: ActivationSaturationMonitor(include=["encoder.*"]),
     r"ActivationSaturationMonitor: include=\['encoder.\*'\] \(exclude=None\) matches no layers to watch in "
     r"ForeignMLP; its layers are: body.0, body.1"),
    (lambda: ConditionNumberProbe(include=["nothing"]), r"ConditionNumberProbe: include=\['nothing'\]"),
    (lambda: GradientFlowMonitor(include=["nothing"]), r"GradientFlowMonitor: include=\['nothing'\]"),
])
def test_an_include_that_matches_nothing_stops_at_setup(make, message, tmp_path):
    seen = []
    module = ForeignMLP()
    module.training_step = lambda batch, i: seen.append(i)
    with pytest.raises(ValueError, match=message):
        L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[make()]).fit(module, loaders()[0])
    assert seen == []  # before the first step


def test_the_rank_collapse_example_shows_collapse_only_without_skips():
    """examples/rank_collapse.py (docs/RESULTS.md section 9): the probe sees pure attention collapse the tokens of a
    sequence to one direction (kappa inf, correlation 1, Dong et al.'s residual 0), and the skip connections
    prevent it."""
    path = Path(__file__).resolve().parents[1] / "examples" / "rank_collapse.py"
    spec = importlib.util.spec_from_file_location("rank_collapse", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    collapsed = example.measure(6, skip=False, tokens=64, seed=0)
    control = example.measure(6, skip=True, tokens=64, seed=0)
    assert collapsed["residual"][0] > 0.05 and collapsed["residual"][-1] < 1e-6
    assert math.isinf(collapsed["kappa"][-1]) and collapsed["collinearity"][-1] > 0.99
    assert collapsed["near_zero"][-1] == pytest.approx(31 / 32)
    assert min(control["residual"]) > 0.5 and all(math.isfinite(k) for k in control["kappa"])
    assert max(control["collinearity"]) < 0.6


def test_a_callback_whose_probe_fails_leaves_the_shared_probe_to_the_others(tmp_path):
    """Saturation's probe_fn fails, condition's works: the shared inputs are still saved, by the one that probes."""

    def broken(module, x):
        raise RuntimeError("no probe for me")
    saturation = ActivationSaturationMonitor(every_n_steps=2, max_overhead=None, probe_fn=broken)
    condition = ConditionNumberProbe(every_n_steps=2, max_overhead=None, probe_size=32)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[saturation, condition],
                        limit_val_batches=1, val_check_interval=2)
    with pytest.warns(UserWarning, match=r"ActivationSaturationMonitor: the probe batch could not go through the "
                                         r"model \(RuntimeError: no probe for me\)"):
        trainer.fit(ForeignMLP(), *loaders())
    assert saturation.probe is None and saturation.probe_mode == "training" and saturation.samples_taken == 3
    assert condition.probe.members == [condition] and condition.samples_taken == 3
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)["callbacks"]
    assert saved[condition.state_key]["probe"]["inputs"].shape == (128, 20)  # drawn for both: all 128 samples
    assert "probe" not in saved[saturation.state_key]
