"""AlphaScheduler: calibrated phase-out of VAN skips, the paper's other modes, and the end state."""
import json
import math

import lightning as L
import pytest
import torch
from deepplain.callbacks import AlphaScheduler
from deepplain.callbacks.alpha import DEFAULT_PHASE_OUT, calibrated_step_sizes
from deepplain.datamodules import FakeDataModule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import deepplain
from deepplain.cli import main
from deepplain.family_modules import VANModule
from tests.foreign import ForeignMLP, loaders


def simulate(eta_alpha, eta_lambda, limit=10 ** 6):
    """Eq. 7-8 for one unit with dC/dalpha = 0: the step after which alpha is 1."""
    alpha, lam = 0.0, -1.0
    for step in range(1, limit):
        alpha = min(1.0, max(0.0, alpha - eta_alpha * lam))
        lam += eta_lambda * (alpha - 1.0)
        if alpha >= 1.0:
            return step
    return None


@pytest.mark.fast
@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.0])
@pytest.mark.parametrize("target", [20, 97, 5000])
def test_calibrated_step_sizes_close_the_skips_at_the_target(ratio, target):
    eta_alpha, eta_lambda = calibrated_step_sizes(target, ratio)
    assert eta_lambda == pytest.approx(ratio * eta_alpha)
    assert abs(simulate(eta_alpha, eta_lambda) - target) <= 1


def van_module(**kw):
    kw.setdefault("alpha_mode", "off")
    return VANModule(model="van", depth=4, arch="mlp", input_shape=(1, 8, 8), num_classes=4,
                     model_options={"width": 16}, lr=0.1, weight_decay=1e-3, **kw)


def van_data():
    return FakeDataModule(input_shape=(1, 8, 8), num_classes=4, train_size=256, test_size=32, batch_size=32,
                          val_split=0.0)


def train(module, scheduler, epochs=4, record=None):
    callbacks = [scheduler] + ([record] if record else [])
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=van_data())
    return trainer


class Record(L.Callback):
    def __init__(self):
        self.alphas, self.lambdas = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        gates = pl_module.model.skip_gates()
        self.alphas.append(torch.cat([g.alpha.detach().clone() for g in gates]))
        self.lambdas.append(torch.cat([g.lagrange_lambda.clone() for g in gates]))


def test_lagrangian_closes_near_target_lambda_never_increases_alpha_in_range():
    torch.manual_seed(0)
    module, record = van_module(), Record()
    scheduler = AlphaScheduler("lagrangian", lambda_lr_ratio=0.5, phase_out=0.5)  # 4 epochs x 8 steps: T = 16
    train(module, scheduler, record=record)
    assert scheduler.target_step == 16
    alphas, lambdas = torch.stack(record.alphas), torch.stack(record.lambdas)
    assert (lambdas[1:] <= lambdas[:-1] + 1e-7).all() and (lambdas[-1] < -1).all()
    assert float(alphas.min()) >= 0 and float(alphas.max()) <= 1
    residual = ((1 - alphas) ** 2).mean(dim=1)
    assert residual[3] > 0.4  # a quarter of the way: the skips are still there
    assert abs(scheduler.summary()["removed_step"] - 16) <= 3 and float(residual[-1]) == 0.0
    assert all((g.alpha == 1).all() for g in module.model.skip_gates())


def test_alpha_is_moved_by_the_scheduler_only():
    """No momentum buffer or weight decay ever touches alpha, whatever the optimizer."""
    torch.manual_seed(0)
    module = van_module()
    trainer = train(module, AlphaScheduler("lagrangian", phase_out=0.9), epochs=1)
    optimizer = trainer.optimizers[0]
    alphas = {id(g.alpha) for g in module.model.skip_gates()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in alphas:
                assert "momentum_buffer" not in optimizer.state.get(p, {})
                assert group["weight_decay"] == 0.0


def test_literal_mode_removes_the_skips_within_about_one_over_eta_steps():
    torch.manual_seed(0)
    module = van_module()
    scheduler = AlphaScheduler("literal", lambda_lr_ratio=0.5)
    train(module, scheduler, epochs=4)  # eta = 0.1: u = cos(wt) - sqrt(2) sin(wt) closes at 0.87 / eta = 8.7 steps
    assert 7 <= scheduler.summary()["removed_step"] <= 12


def test_unconstrained_mode_keeps_lambda_zero_and_alpha_free():
    torch.manual_seed(0)
    module = van_module()
    train(module, AlphaScheduler("unconstrained"), epochs=2)
    gates = module.model.skip_gates()
    assert all((g.lagrange_lambda == 0).all() for g in gates)
    alphas = torch.cat([g.alpha.detach() for g in gates])
    assert float(alphas.max()) < 1 and float(alphas.min()) >= 0  # no constraint: skips stay


@pytest.mark.parametrize("mode", ["linear", "cosine"])
def test_deterministic_modes_reach_one_at_phase_out(mode):
    module, record = van_module(), Record()
    scheduler = AlphaScheduler(mode, phase_out=2)  # epoch 2 of 3: step 16
    train(module, scheduler, epochs=3, record=record)
    progress = [min(1.0, step / 16) for step in range(24)]
    expected = progress if mode == "linear" else [0.5 * (1 - math.cos(math.pi * p)) for p in progress]
    # alpha is set at each batch start for that step; the optimizer never moves it
    assert [float(a.mean()) for a in record.alphas] == pytest.approx(expected, abs=1e-6)
    assert all((g.alpha == 1).all() for g in module.model.skip_gates())


def test_fully_phased_out_van_folds_into_an_equal_plain_network():
    torch.manual_seed(0)
    module = van_module()
    train(module, AlphaScheduler("lagrangian", phase_out=0.5), epochs=4)
    model = module.model.eval()
    plain = deepplain.fold(model).eval()
    x = torch.randn(8, 1, 8, 8)
    assert torch.allclose(model(x), plain(x), atol=1e-5)


def test_scheduler_needs_gates_and_refuses_another_mode_on_resume():
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[AlphaScheduler()],
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="AlphaScheduler found no VAN skip gates in ForeignMLP"):
        trainer.fit(ForeignMLP(), loaders()[0])
    with pytest.raises(ValueError, match="trained with alpha mode 'linear', not 'lagrangian'"):
        AlphaScheduler().load_state_dict({"mode": "linear"})
    with pytest.raises(ValueError, match="lambda_lr_ratio must be a finite number"):
        AlphaScheduler(lambda_lr_ratio=float("nan"))


def test_duck_typed_gate_in_a_foreign_module():
    """Any module with an `alpha` parameter and a `lagrange_lambda` buffer is a gate."""
    class Gate(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.alpha = nn.Parameter(torch.zeros(n))
            self.register_buffer("lagrange_lambda", torch.full((n,), -1.0))

        def forward(self, x):
            return (1 - self.alpha) * x

    class Residual(ForeignMLP):
        def __init__(self):
            super().__init__(depth=2)
            self.gate = Gate(32)

        def forward(self, x):
            h = self.body[:2](x)
            return self.head(self.body[2:](h) + self.gate(h))

    torch.manual_seed(0)
    module = Residual()
    scheduler = AlphaScheduler("lagrangian", phase_out=0.5)
    L.Trainer(max_epochs=4, accelerator="cpu", logger=False, callbacks=[scheduler], enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(module, loaders()[0])
    assert (module.gate.alpha == 1).all() and scheduler.summary()["removed_step"] is not None


def test_van_mlp_preset_phases_out_gradually(runs):
    """The VAN MLP recipe (30 blocks, MNIST, lr 0.001, eta' = eta/2) on 8 batches per epoch for 10 epochs: the
    skips are still there after the first epoch, and gone near the default target (120/165 of the run)."""
    assert main(["--preset", "van-mlp-mnist", "--epochs", "10", "--limit-train-batches", "8", "--limit-val-batches",
                 "1", "--diagnostics", "none", "--logdir", str(runs), "--no-progress"]) == 0
    run = next(runs.glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    target = round(DEFAULT_PHASE_OUT * 80)
    assert summary["alpha_target_step"] == target and summary["alpha_residual"] == 0.0
    assert abs(summary["alpha_removed_step"] - target) <= 8
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    residual = {e.step: e.value for e in acc.Scalars("alpha/residual")}
    assert residual[0] == 1.0 and residual[8] > 0.5  # end of epoch 1: most of the skip is still there
    values = [residual[s] for s in sorted(residual)]
    assert all(b <= a + 0.02 for a, b in zip(values, values[1:]))  # decays without jumping back
    lambdas = [e.value for e in acc.Scalars("alpha/lambda")]
    assert all(b <= a + 1e-6 for a, b in zip(lambdas, lambdas[1:]))
