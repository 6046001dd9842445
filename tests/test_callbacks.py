"""Diagnostic callbacks: statistics against independent computations, and use in foreign modules."""
import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import (ActivationSaturationMonitor, AlphaScheduler, ConditionNumberProbe, GradientFlowMonitor,
                       MaxNormConstraint, apply_max_norm, condition_number, infinity_norm_condition)
from callbacks.condition import representation_matrix, representation_stats
from callbacks.saturation import activation_stats, combine
from deepplain.errors import ConfigError
from tests.foreign import ForeignCNN, ForeignMLP, FunctionalMLP, loaders


# -- statistics --------------------------------------------------------------------------------------
def test_condition_number_matches_numpy_svd():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 7)) @ np.diag([1, 2, 3, 5, 8, 13, 1e-3])
    s = np.linalg.svd(a, compute_uv=False)
    assert condition_number(a) == pytest.approx(s[0] / s[-1], rel=1e-9)
    assert condition_number(torch.tensor(a, dtype=torch.float32)) == pytest.approx(s[0] / s[-1], rel=1e-3)


def test_singular_matrix_gives_inf_and_rank_deficiency():
    a = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.5, 1.0, 1.5], [1.0, 0.0, 1.0]])  # columns 1, 2 and 3 dependent
    a[:, 2] = a[:, 0] + a[:, 1]
    assert condition_number(a) == math.inf
    stats = representation_stats(torch.tensor(a))
    assert stats["kappa"] == math.inf and stats["rank"] == np.linalg.matrix_rank(a) == 2
    assert stats["near_zero"] == pytest.approx(1 / 3)
    assert condition_number(np.zeros((3, 3))) == math.inf


def test_infinity_norm_condition_matches_numpy():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 6))
    assert infinity_norm_condition(w) == pytest.approx(np.linalg.cond(w, p=np.inf), rel=1e-9)
    assert infinity_norm_condition(np.ones((3, 3))) == math.inf


def test_collinearity_of_hand_built_units():
    rng = np.random.default_rng(2)
    base = rng.normal(size=200)
    x = np.stack([base, -2 * base + 1, rng.normal(size=200), np.full(200, 3.0)], axis=1)  # last unit constant
    stats = representation_stats(torch.tensor(x))
    corr = np.corrcoef(x[:, :3], rowvar=False)
    expected = np.abs(corr[~np.eye(3, dtype=bool)]).mean()
    assert stats["collinearity"] == pytest.approx(expected, rel=1e-9)


def test_conv_representation_is_positions_by_channels():
    out = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    m = representation_matrix(out)
    assert m.shape == (8, 3) and m.dtype == torch.float64
    assert torch.equal(m[0], torch.tensor([0.0, 4.0, 8.0], dtype=torch.float64))


def test_saturation_shares_on_hand_built_activations():
    a = torch.tensor([[0.0, 0.01, 60.0, 1.0],
                      [0.0, -0.02, 2.0, -100.0],
                      [0.0, 0.5, 3.0, 0.0]])
    sums, alive = activation_stats(a, low=0.05, high=50)
    stats = combine(sums.unsqueeze(0), alive.unsqueeze(0))
    assert stats["mean_abs"] == pytest.approx(a.abs().mean().item())
    assert stats["max_abs"] == 100.0
    assert stats["frac_low"] == pytest.approx(6 / 12)      # 4 zeros, 0.01, -0.02
    assert stats["frac_high"] == pytest.approx(2 / 12)
    assert stats["frac_zero"] == pytest.approx(4 / 12)
    assert stats["frac_dead"] == pytest.approx(1 / 4)      # unit 0 is zero on the whole batch
    # two ranks: the combined statistics equal those of the concatenated batch
    b = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    s2, a2 = activation_stats(b, 0.05, 50)
    merged = combine(torch.stack([sums, s2]), torch.stack([alive, a2]))
    whole = combine(*[t.unsqueeze(0) for t in activation_stats(torch.cat([a, b]), 0.05, 50)])
    assert merged == pytest.approx(whole)
    assert merged["frac_dead"] == 0.0


def test_max_norm_bounds_rows_and_leaves_others_untouched():
    torch.manual_seed(0)
    w = torch.randn(10, 6) * torch.linspace(0.1, 3, 10)[:, None]
    before = w.clone()
    over = apply_max_norm(w, 3.0)
    norms = w.norm(dim=1)
    assert (norms <= 3.0 + 1e-5).all()
    assert torch.equal(w[~over], before[~over])  # bit-for-bit
    assert torch.allclose(norms[over], torch.full((int(over.sum()),), 3.0))
    conv = torch.randn(4, 3, 3, 3) * 5
    apply_max_norm(conv, 1.0)
    assert torch.allclose(conv.flatten(1).norm(dim=1), torch.ones(4), atol=1e-5)


# -- in foreign LightningModules ----------------------------------------------------------------------
def fit(module, callbacks, tmp_path, kind="mlp", steps=6, precision="32-true", accumulate=1, logger=True, **kw):
    train, val = loaders(kind)
    log = TensorBoardLogger(str(tmp_path), name="tb") if logger else False
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=log,
                        precision=precision, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=1, val_check_interval=3,
                        accumulate_grad_batches=accumulate, log_every_n_steps=1, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    return trainer


def read_events(tmp_path):
    acc = EventAccumulator(str(next((tmp_path / "tb").glob("version_*"))),
                           size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def all_diagnostics(every=2):
    return [ActivationSaturationMonitor(every_n_steps=every, figure_every_n_samples=1, max_overhead=None),
            ConditionNumberProbe(every_n_steps=every, max_overhead=None),
            GradientFlowMonitor(every_n_steps=every, figure_every_n_samples=1, max_overhead=None), MaxNormConstraint(3.0)]


@pytest.mark.parametrize("module_cls,kind", [(ForeignMLP, "mlp"), (ForeignCNN, "cnn")])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_callbacks_in_foreign_modules(module_cls, kind, precision, tmp_path):
    torch.manual_seed(0)
    cbs = all_diagnostics()
    fit(module_cls(), cbs, tmp_path, kind=kind, precision=precision)
    acc = read_events(tmp_path)
    scalars, images, hists = acc.Tags()["scalars"], acc.Tags()["images"], acc.Tags()["histograms"]
    layer = "body.1" if kind == "mlp" else "body.2"  # the first ReLU
    for tag in [f"saturation/train/mean_abs/{layer}", f"saturation/train/frac_dead/{layer}",
                f"saturation/probe/max_abs/{layer}", f"condition/kappa/{layer}", f"condition/collinearity/{layer}",
                "condition/weight_kappa/body.0", "condition/weight_kappa_inf/head", "grad_flow/norm/body.0",
                "grad_flow/mean_abs/head", "max_norm/rescaled/body.0"]:
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars(f"saturation/train/mean_abs/{layer}")][:3] == [0, 2, 4]  # step 0 included
    for tag in ["saturation/train/profile_magnitude", "saturation/probe/profile_shares",
                "condition/profile_representation", "condition/profile_weights", "grad_flow/profile"]:
        assert tag in images, tag
    assert any(t.startswith("condition/heatmap/") for t in images)
    assert f"saturation/train/hist/{layer}" in hists
    assert acc.Tensors("custom_scalars__config__")  # the custom-scalars layout
    sat = cbs[0].last_stats[layer]
    assert all(math.isfinite(v) for v in sat.values())


def test_hooks_are_removed_between_samples(tmp_path):
    module = ForeignMLP()
    monitor = ActivationSaturationMonitor(every_n_steps=100)
    fit(module, [monitor, ConditionNumberProbe(every_n_steps=100)], tmp_path, steps=3)
    assert all(not m._forward_hooks for m in module.modules())


def test_callbacks_fall_back_to_linear_layers_without_activation_modules(tmp_path):
    monitor = ActivationSaturationMonitor(every_n_steps=1)
    fit(FunctionalMLP(), [monitor], tmp_path, steps=2, logger=False)
    assert list(monitor.last_stats) == ["l1", "l2"]  # the classifier "out" is left out


def test_include_exclude_patterns(tmp_path):
    monitor = ActivationSaturationMonitor(every_n_steps=1, include=["body.*"], exclude=["body.3"])
    fit(ForeignMLP(), [monitor], tmp_path, steps=1, logger=False)
    assert list(monitor.last_stats) == ["body.1", "body.5", "body.7"]


def test_saturation_warns_once_naming_layers(tmp_path):
    module = ForeignMLP()
    with torch.no_grad():
        for m in module.body:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(1e-4)
                m.bias.zero_()
    monitor = ActivationSaturationMonitor(every_n_steps=1)
    train, _ = loaders()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, callbacks=[monitor], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    with pytest.warns(UserWarning, match="activations vanished \\(mean \\|a\\| < 0.05\\) in .* layer\\(s\\): body.*") as w:
        trainer.fit(module, train)
    assert sum("vanished" in str(x.message) for x in w) == 1


def test_max_norm_only_after_real_optimizer_steps(tmp_path):
    module = ForeignMLP(lr=5.0)  # large steps push rows past the bound
    cb = MaxNormConstraint(0.5, skip_classifier=True)
    calls = []
    original = cb.on_train_batch_end

    def spy(trainer, *args):
        calls.append(trainer.global_step)
        original(trainer, *args)
    cb.on_train_batch_end = spy
    applied = []
    import callbacks.max_norm as mn
    real = mn.apply_max_norm
    mn.apply_max_norm = lambda w, c: applied.append(1) or real(w, c)
    try:
        fit(module, [cb], tmp_path, steps=3, accumulate=2, logger=False)
    finally:
        mn.apply_max_norm = real
    assert len(calls) == 6 and len(applied) == 3 * 4  # 6 batches, 3 optimizer steps, 4 hidden layers
    for m in module.body:
        if isinstance(m, torch.nn.Linear):
            assert (m.weight.norm(dim=1) <= 0.5 + 1e-5).all()
    assert (module.head.weight.norm(dim=1) > 0.5).any()  # classifier skipped


# -- AlphaScheduler ----------------------------------------------------------------------------------------
def van_module(**kw):
    from deepplain.family_modules import VANModule
    return VANModule(model="van", depth=4, arch="mlp", input_shape=(1, 8, 8), num_classes=4,
                     model_options={"width": 16}, lr=0.1, **kw)


def van_data():
    from datamodules import FakeDataModule
    return FakeDataModule(input_shape=(1, 8, 8), num_classes=4, train_size=256, test_size=32, batch_size=32,
                          val_split=0.0)


def test_lagrangian_drives_alpha_to_one_and_lambda_only_decreases(tmp_path):
    torch.manual_seed(0)
    module = van_module(alpha_mode="off")
    scheduler = AlphaScheduler("lagrangian", lambda_lr_ratio=0.5)
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            history.append(torch.cat([g.lagrange_lambda.clone() for g in pl_module.model.skip_gates()]))
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, callbacks=[scheduler, Record()],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=van_data())
    alphas = torch.cat([g.alpha.detach() for g in module.model.skip_gates()])
    assert float(alphas.mean()) > 0.99 and float(alphas.min()) >= 0 and float(alphas.max()) <= 1
    lambdas = torch.stack(history)
    assert (lambdas[1:] <= lambdas[:-1] + 1e-7).all() and (lambdas[-1] < -1).all()
    assert scheduler.summary()["residual"] < 1e-3


def test_unconstrained_mode_zeroes_lambda_and_linear_mode_is_deterministic(tmp_path):
    module = van_module(alpha_mode="unconstrained")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=van_data())
    assert all((g.lagrange_lambda == 0).all() for g in module.model.skip_gates())
    linear = van_module(alpha_mode="linear", phase_out_epochs=2)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(linear, datamodule=van_data())
    assert all((g.alpha == 1).all() for g in linear.model.skip_gates())


def test_alpha_scheduler_rejects_models_without_gates(tmp_path):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, callbacks=[AlphaScheduler()],
                        enable_progress_bar=False, enable_model_summary=False)
    train, _ = loaders()
    with pytest.raises(ConfigError, match="AlphaScheduler found no VAN skip gates in ForeignMLP"):
        trainer.fit(ForeignMLP(), train)


def test_alpha_state_survives_checkpoint(tmp_path):
    module = van_module()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=van_data())
    path = tmp_path / "van.ckpt"
    trainer.save_checkpoint(path)
    from deepplain.family_modules import VANModule
    restored = VANModule.load_from_checkpoint(path)
    for a, b in zip(module.model.skip_gates(), restored.model.skip_gates()):
        assert torch.equal(a.alpha, b.alpha) and torch.equal(a.lagrange_lambda, b.lagrange_lambda)
    assert not torch.equal(restored.model.skip_gates()[0].lagrange_lambda, torch.full((16,), -1.0))
    state = torch.load(path, weights_only=False)["callbacks"]
    assert any(k.startswith("AlphaScheduler") for k in state)


def test_one_callbacks_probe_is_not_seen_by_anothers_training_capture(tmp_path):
    saturation = ActivationSaturationMonitor(every_n_steps=1)
    fit(ForeignMLP(), [saturation, ConditionNumberProbe(every_n_steps=1)], tmp_path, steps=2, logger=False)
    assert list(saturation.last_stats) == ["body.1", "body.3", "body.5", "body.7"]


def test_non_finite_matrices_give_nan_not_a_crash():
    a = np.ones((4, 3))
    a[1, 2] = np.nan
    assert math.isnan(condition_number(a)) and math.isnan(infinity_norm_condition(a))
    assert all(math.isnan(v) for v in representation_stats(torch.tensor(a)).values())


def test_overhead_budget_postpones_work_beyond_its_share():
    from callbacks._common import OverheadBudget
    import time
    budget = OverheadBudget(0.5)
    budget.start()
    assert budget.allows()  # the first piece of work always runs
    with budget.charge():
        time.sleep(0.05)
    assert not budget.allows() and budget.postponed == 1  # 0.05 s spent of ~0.05 s elapsed
    time.sleep(0.12)
    assert budget.allows()  # now under half of the elapsed time
    assert OverheadBudget(None).allows()
    with pytest.raises(ValueError, match="max_overhead must be in"):
        OverheadBudget(1.5)


def test_default_cadence_samples_step_zero_and_respects_budget(tmp_path):
    probe = ConditionNumberProbe(every_n_steps=1, max_overhead=1e-6)
    fit(ForeignMLP(), [probe], tmp_path, steps=4, logger=False)
    assert probe.samples_taken == 1 and probe.budget.postponed == 3  # step 0 only; the rest postponed


def test_infinity_norm_condition_of_non_square_uses_pseudo_inverse():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 8))
    expected = np.linalg.norm(w, np.inf) * np.linalg.norm(np.linalg.pinv(w), np.inf)
    assert infinity_norm_condition(w) == pytest.approx(expected, rel=1e-9)
