"""ConditionNumberProbe's cost rule (callbacks/costs.py) and the Cholesky estimate of kappa (linalg): what a run
measures and says, decided from shapes and given rates (never from this machine's speed), and the estimate against
numpy's exact condition numbers."""
import logging
import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe
from deepplain.callbacks import costs
from deepplain.callbacks.costs import LayerShape, Rates, WeightShape, everything, plan_full_samples
from deepplain.callbacks.linalg import estimate_gram_kappa, estimated_representation_stats, gram
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.foreign import ForeignMLP

RANK_ZERO = "lightning.pytorch.utilities.rank_zero"  # where Lightning's rank_zero_info lines go
RATES = Rates(gram=1e-10, eigh=4e-9, estimate=1e-9, inverse=2e-9)


def representation(units, rows, estimated):
    return RATES.gram * rows * units ** 2 + (RATES.estimate if estimated else RATES.eigh) * units ** 3


@pytest.mark.fast
def test_the_plan_takes_layers_cheapest_first_exactly_then_estimated_then_not_at_all():
    layers = [LayerShape("wide", 2048), LayerShape("narrow", 50), LayerShape("mid", 300), LayerShape("wider", 4096)]
    weights = [WeightShape("w.big", 2048, 2048), WeightShape("w.small", 50, 300)]
    forward = 1e-5  # seconds per probe sample
    # per full sample 12 s: narrow and mid exactly (well under a second); wide exactly would be 36 s (its
    # eigenvalues alone 4e-9 x 2048^3 = 34 s), estimated 10.3 s (the Gram 1.7 s, the estimate 8.6 s) with the probe
    # grown to 4,096 samples: it fits; wider (4,096 units) fits neither way
    allowance = 2 * 12.0
    plan = plan_full_samples(layers, weights, forward, allowance, RATES)
    assert plan.exact == ["narrow", "mid"] and plan.estimated == ["wide"] and plan.left_out == ["wider"]
    assert plan.probe_size == 4096  # twice the widest layer measured
    spectra = (representation(50, 4096, False) + representation(300, 4096, False)
               + representation(2048, 4096, True))
    small = RATES.inverse * 50 ** 3 + RATES.gram * 300 * 50 ** 2  # the rectangular weight via its Gram
    assert plan.weights == ["w.small"] and plan.left_out_weights == ["w.big"]  # 2e-9 * 2048^3 = 17 s: no room
    assert plan.seconds == pytest.approx(forward * 4096 + spectra + small)
    assert plan.widths == {"narrow": 50, "mid": 300, "wide": 2048}
    # a larger allowance measures the wide layer exactly; an unlimited one, everything
    assert plan_full_samples(layers, weights, forward, 2 * 40.0, RATES).exact == ["wide", "narrow", "mid"]
    full = everything(layers, weights)
    assert full.exact == ["wide", "narrow", "mid", "wider"] and full.probe_size == 4096 and not full.left_out


@pytest.mark.fast
def test_a_probe_size_given_by_the_user_is_kept():
    plan = plan_full_samples([LayerShape("a", 300), LayerShape("b", 40)], [], 1e-5, 1.0, RATES, fixed_probe=100)
    assert plan.probe_size == 100 and plan.exact == ["a", "b"]


@pytest.mark.fast
@pytest.mark.parametrize("kappa", [3.0, 1e2, 1e4, 1e6])
def test_the_estimate_equals_the_exact_kappa_of_a_hand_built_matrix(kappa):
    """H = U diag(s) V^T with 400 singular values from 1 to 1/kappa: the estimate is numpy's kappa within 1e-4."""
    g = np.random.default_rng(0)
    u, _ = np.linalg.qr(g.standard_normal((1200, 400)))
    v, _ = np.linalg.qr(g.standard_normal((400, 400)))
    s = np.logspace(0, -math.log10(kappa), 400)  # evenly spread: the slowest case for a Krylov estimate
    h = torch.from_numpy(u @ np.diag(s) @ v.T).float()
    exact = np.linalg.cond(h.double().numpy())
    assert estimate_gram_kappa(gram(h)) == pytest.approx(exact, rel=1e-4)


@pytest.mark.fast
def test_the_estimate_on_relu_representations_and_singular_layers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 300, generator=g)
    h = torch.relu(x @ torch.randn(300, 500, generator=g) / 17)  # 500 ReLU units on 1,200 samples
    stats = estimated_representation_stats(h)
    assert stats["kappa"] == pytest.approx(np.linalg.cond(h.double().numpy()), rel=1e-4)
    assert math.isnan(stats["rank"]) and math.isnan(stats["near_zero"])  # need the spectrum: not measured
    corr = np.corrcoef(h.double().numpy(), rowvar=False)
    assert stats["collinearity"] == pytest.approx(np.abs(corr[~np.eye(500, dtype=bool)]).mean(), rel=1e-6)
    dead = h.clone()
    dead[:, 7] = 0  # a dead unit: singular
    assert math.isinf(estimated_representation_stats(dead)["kappa"])
    assert math.isinf(estimated_representation_stats(h[:400])["kappa"])  # fewer samples than units
    state = torch.get_rng_state()
    estimate_gram_kappa(gram(h))
    assert torch.equal(torch.get_rng_state(), state)  # its own generator


class Widening(L.LightningModule):
    """Two narrow ReLU layers and a wide one, as a drop-in user's model."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 512),
                                  nn.ReLU())
        self.head = nn.Linear(512, 4)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_widening(callbacks, steps=6, ckpt_path=None) -> L.Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(2048, 20, generator=g), torch.randint(0, 4, (2048,), generator=g))
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Widening(), DataLoader(data, batch_size=32), ckpt_path=ckpt_path)
    return trainer


def test_a_layer_whose_spectrum_does_not_fit_is_left_out_and_said_once(monkeypatch, caplog):
    """Rates under which a 512-unit spectrum takes 13 s and a 32-unit one 3 ms: the drop-in probe measures the
    narrow layers, leaves the wide one out, sizes its probe for what it measures, and says so once, with the
    ways to get the rest."""
    monkeypatch.setattr(costs, "measured_rates", lambda device="cpu": Rates(gram=1e-12, eigh=1e-7, estimate=1e-7,
                                                                            inverse=1e-7))
    probe, saturation = ConditionNumberProbe(), ActivationSaturationMonitor()
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        fit_widening([saturation, probe])
    assert probe.plan.exact == ["body.1", "body.3"] and probe.plan.left_out == ["body.5"]
    assert probe.plan.weights == ["body.0", "body.2", "body.4", "head"]  # 512 x 32: a 32-unit inverse, cheap
    assert set(probe.last_stats) == {"body.1", "body.3"} and set(probe.last_weight_stats) == set(probe.plan.weights)
    assert probe.plan.probe_size == 256 and probe.probe.inputs.shape[0] == 256  # not the 1,024 body.5 would need
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ConditionNumberProbe: this run")]
    assert len(said) == 1, said
    assert "they measure 2 of 3 layers exactly, and leave out the representations of body.5 (512 units)." in said[0]
    assert "full_sample_share=0.2 or more, max_overhead=None, or every_n_steps=N" in said[0]
    assert set(saturation.last_stats) == {"body.1", "body.3", "body.5"}  # the cheap statistics: every layer


def test_without_a_budget_every_layer_is_measured_exactly(monkeypatch, caplog):
    monkeypatch.setattr(costs, "measured_rates", lambda device="cpu": pytest.fail("no plan without a budget"))
    for probe in (ConditionNumberProbe(max_overhead=None), ConditionNumberProbe(every_n_steps=3)):
        with caplog.at_level(logging.INFO, logger=RANK_ZERO):
            fit_widening([probe])
        assert probe.plan.exact == ["body.1", "body.3", "body.5"] and probe.plan.probe_size == 1024
        assert set(probe.last_stats) == {"body.1", "body.3", "body.5"}
    assert not [r for r in caplog.records if r.getMessage().startswith("ConditionNumberProbe: this run")]


def test_a_resumed_run_measures_what_it_measured_before(monkeypatch, tmp_path):
    """The plan is kept in checkpoints: resumed on a machine (or rates) that would afford everything, the run goes
    on measuring the layers it measured, so its depth profiles and images stay comparable."""
    monkeypatch.setattr(costs, "measured_rates", lambda device="cpu": Rates(gram=1e-12, eigh=1e-7, estimate=1e-7,
                                                                            inverse=1e-7))
    probe = ConditionNumberProbe()
    trainer = fit_widening([probe], steps=4)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    monkeypatch.setattr(costs, "measured_rates", lambda device="cpu": pytest.fail("a resume plans nothing again"))
    resumed = ConditionNumberProbe()
    fit_widening([resumed], steps=8, ckpt_path=tmp_path / "c.ckpt")
    assert resumed.plan == probe.plan and set(resumed.last_stats) == {"body.1", "body.3"}


def test_a_narrow_foreign_model_is_measured_whole_with_the_defaults():
    """The plan never costs a small model anything: a 4-layer, 32-unit MLP has every layer measured exactly."""
    probe = ConditionNumberProbe()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 20, generator=g), torch.randint(0, 4, (512,), generator=g))
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[probe]).fit(ForeignMLP(), DataLoader(data, batch_size=32))
    assert probe.plan.exact == ["body.1", "body.3", "body.5", "body.7"] and not probe.plan.left_out
