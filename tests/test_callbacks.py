"""Diagnostic callbacks: statistics against independent computations, and use in foreign modules."""
import csv
import math

import deepplain.callbacks.max_norm as mn
import lightning as L
import numpy as np
import pytest
import torch
from conftest import fit, read_events
from deepplain.callbacks import (
    ActivationSaturationMonitor,
    ConditionNumberProbe,
    GradientFlowMonitor,
    MaxNormConstraint,
    apply_max_norm,
    condition_number,
    infinity_norm_condition,
)
from deepplain.callbacks.condition import probe_size_for, representation_matrix
from deepplain.callbacks.linalg import (
    FLOAT32_KAPPA_LIMIT,
    FLOAT32_TIERS,
    representation_stats,
    representation_stats_many,
    singular_values,
    weight_condition_stats,
)
from deepplain.callbacks.saturation import activation_stats, combine

from tests.foreign import ForeignCNN, ForeignMLP, FunctionalMLP, loaders


# -- statistics --------------------------------------------------------------------------------------
@pytest.mark.fast
def test_condition_number_matches_numpy_svd():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 7)) @ np.diag([1, 2, 3, 5, 8, 13, 1e-3])
    s = np.linalg.svd(a, compute_uv=False)
    assert condition_number(a) == pytest.approx(s[0] / s[-1], rel=1e-9)
    assert condition_number(torch.tensor(a, dtype=torch.float32)) == pytest.approx(s[0] / s[-1], rel=1e-3)


def known_spectrum(rng, m, n, kappa):
    u, _ = np.linalg.qr(rng.normal(size=(m, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (u * np.logspace(0, -np.log10(kappa), n)) @ v.T


@pytest.mark.fast
@pytest.mark.parametrize("shape", [(600, 300), (300, 300), (256, 50), (4096, 16)])
def test_batched_float32_spectra_agree_with_numpy_float64(shape):
    """Within the float32 tiers the documented accuracy holds; above the limit float64 recomputes exactly."""
    rng = np.random.default_rng(1)
    kappas = [1e1, 1e2, 1e3, 0.9e5, 0.9 * FLOAT32_KAPPA_LIMIT, 10 * FLOAT32_KAPPA_LIMIT, 1e9]
    matrices = [known_spectrum(rng, *shape, k) for k in kappas]
    spectra = singular_values([torch.tensor(m, dtype=torch.float32) for m in matrices])
    for kappa, m, s in zip(kappas, matrices, spectra):
        reference = np.linalg.svd(m, compute_uv=False)
        got = float(s.max() / s.min())
        tiers = [tol for limit, tol in FLOAT32_TIERS if kappa <= limit]
        tolerance = tiers[0] if tiers else 1e-6  # above the limit: float64 from the float32 copy of m
        expected = np.linalg.svd(m.astype(np.float32).astype(np.float64), compute_uv=False)
        assert got == pytest.approx(expected[0] / expected[-1], rel=tolerance), kappa
        if kappa < 1e6:  # beyond that, storing the matrix in float32 has already moved its small singular values
            assert got == pytest.approx(reference[0] / reference[-1], rel=1e-2), kappa


@pytest.mark.fast
def test_statistics_from_the_gram_matrix_equal_the_direct_ones():
    """representation_stats_many shares one float64 Gram matrix between spectrum and collinearity; it agrees
    with representation_stats on ordinary, wide, rank-deficient and nearly constant matrices."""
    rng = np.random.default_rng(2)
    ordinary = np.maximum(rng.normal(size=(600, 50)) @ rng.normal(size=(50, 50)) + 0.5, 0)
    wide = rng.normal(size=(20, 60))
    deficient = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 30))
    constant = 1 + 1e-5 * rng.normal(size=(100, 8))  # variance 1e-10 of the second moment: cancels
    matrices = [torch.tensor(m, dtype=torch.float32) for m in (ordinary, wide, deficient, constant)]
    for got, m in zip(representation_stats_many(matrices), matrices):
        expected = representation_stats(m)
        for key in ("kappa", "rank", "near_zero"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6), key
        assert got["collinearity"] == pytest.approx(expected["collinearity"], rel=1e-4, nan_ok=True)


@pytest.mark.fast
def test_singular_matrix_gives_inf_and_rank_deficiency():
    a = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.5, 1.0, 1.5], [1.0, 0.0, 1.0]])
    a[:, 2] = a[:, 0] + a[:, 1]  # columns dependent
    assert condition_number(a) == math.inf
    stats = representation_stats(torch.tensor(a))
    assert stats["kappa"] == math.inf and stats["rank"] == np.linalg.matrix_rank(a) == 2
    assert stats["near_zero"] == pytest.approx(1 / 3)
    assert condition_number(np.zeros((3, 3))) == math.inf
    assert representation_stats(torch.tensor(a, dtype=torch.float32))["kappa"] == math.inf  # float32 input too


@pytest.mark.fast
def test_infinity_norm_condition_matches_numpy():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 6))
    assert infinity_norm_condition(w) == pytest.approx(np.linalg.cond(w, p=np.inf), rel=1e-9)
    assert infinity_norm_condition(np.ones((3, 3))) == math.inf


@pytest.mark.fast
def test_infinity_norm_condition_of_non_square_uses_pseudo_inverse():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 8))
    expected = np.linalg.norm(w, np.inf) * np.linalg.norm(np.linalg.pinv(w), np.inf)
    assert infinity_norm_condition(w) == pytest.approx(expected, rel=1e-9)


@pytest.mark.fast
def test_batched_weight_conditions_match_numpy():
    rng = np.random.default_rng(4)
    weights = [rng.normal(size=(30, 30)), known_spectrum(rng, 30, 30, 1e7), rng.normal(size=(20, 30)),
               np.ones((10, 10))]
    rows = weight_condition_stats([torch.tensor(w, dtype=torch.float32) for w in weights], norms=("inf", "2"))
    for w, row in zip(weights, rows):
        w32 = w.astype(np.float32).astype(np.float64)
        s = np.linalg.svd(w32, compute_uv=False)
        if np.linalg.matrix_rank(w32) < min(w.shape):
            assert row["weight_kappa_inf"] == math.inf and row["weight_kappa"] == math.inf
            continue
        expected_inf = np.linalg.norm(w32, np.inf) * np.linalg.norm(np.linalg.pinv(w32), np.inf)
        assert row["weight_kappa_inf"] == pytest.approx(expected_inf, rel=1e-3)
        assert row["weight_kappa"] == pytest.approx(s[0] / s[-1], rel=1e-3)


@pytest.mark.fast
def test_collinearity_of_hand_built_units():
    rng = np.random.default_rng(2)
    base = rng.normal(size=200)
    x = np.stack([base, -2 * base + 1, rng.normal(size=200), np.full(200, 3.0)], axis=1)  # last unit constant
    stats = representation_stats(torch.tensor(x))
    corr = np.corrcoef(x[:, :3], rowvar=False)
    expected = np.abs(corr[~np.eye(3, dtype=bool)]).mean()
    assert stats["collinearity"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.fast
def test_conv_representation_is_positions_by_channels():
    out = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    m = representation_matrix(out)
    assert m.shape == (8, 3) and m.dtype == torch.float32
    assert torch.equal(m[0], torch.tensor([0.0, 4.0, 8.0]))


@pytest.mark.fast
def test_probe_size_covers_the_widest_layer():
    assert probe_size_for([(300, 1)] * 3) == 600           # an MLP of 300 units: 2 x 300 samples
    assert probe_size_for([(50, 1)]) == 256                # at least 256
    assert probe_size_for([(640, 64), (160, 1024)]) == 256  # conv: positions x samples rows are plenty
    assert probe_size_for([(3000, 1)]) == 4096              # capped


@pytest.mark.fast
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


@pytest.mark.fast
def test_non_finite_matrices_give_nan_not_a_crash():
    a = np.ones((4, 3))
    a[1, 2] = np.nan
    assert math.isnan(condition_number(a)) and math.isnan(infinity_norm_condition(a))
    assert all(math.isnan(v) for v in representation_stats(torch.tensor(a)).values())


@pytest.mark.fast
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
def all_diagnostics(every=2):
    return [ActivationSaturationMonitor(every_n_steps=every, figure_every_n_samples=1, max_overhead=None,
                                        per_layer_scalars=True),
            ConditionNumberProbe(every_n_steps=every, max_overhead=None, weight_norms=("inf", "2"),
                                 per_layer_scalars=True),
            GradientFlowMonitor(every_n_steps=every, figure_every_n_samples=1, max_overhead=None,
                                per_layer_scalars=True),
            MaxNormConstraint(3.0, per_layer_scalars=True)]


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
                f"saturation/probe/max_abs/{layer}", f"condition/log10_kappa/{layer}",
                f"condition/collinearity/{layer}", "condition/weight_log10_kappa/body.0",
                "condition/weight_log10_kappa_inf/head", "grad_flow/norm/body.0", "grad_flow/mean_abs/head",
                "max_norm/rescaled/body.0", "overview/layers_vanished", "overview/worst_log10_kappa"]:
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars(f"saturation/train/mean_abs/{layer}")] == [0, 2, 4, 5]  # 0 and the last
    assert [e.step for e in acc.Scalars(f"condition/log10_kappa/{layer}")] == [0, 2, 4, 6]  # the last: after the update
    for tag in ["saturation/probe/profile", "condition/profile", "grad_flow/profile", "saturation/depth_time/max_abs",
                "saturation/probe/depth_time/max_abs", "condition/depth_time/log10_kappa", "grad_flow/depth_time/norm",
                "max_norm/depth_time/rescaled"]:
        assert tag in images, tag
    assert any(t.startswith("condition/heatmap/") for t in images)
    assert f"saturation/probe/hist/{layer}" in hists
    assert acc.Tensors("custom_scalars__config__")  # the custom-scalars layout
    for cb in cbs[:3]:
        assert all(math.isfinite(v) for row in cb.last_stats.values() for v in row.values()
                   if not (isinstance(cb, ConditionNumberProbe)))


def test_logged_statistics_equal_an_independent_computation(tmp_path):
    """What TensorBoard holds for a layer equals numpy's statistics of that layer's output."""
    torch.manual_seed(0)
    module = ForeignMLP()
    initial = ForeignMLP()
    initial.load_state_dict(module.state_dict())
    probe_inputs = torch.randn(100, 20, generator=torch.Generator().manual_seed(1))
    monitor = ActivationSaturationMonitor(every_n_steps=100, probe=False, max_overhead=None, per_layer_scalars=True)
    probe = ConditionNumberProbe(every_n_steps=100, max_overhead=None, probe_size=64, probe_batch=probe_inputs,
                                 per_layer_scalars=True)
    first = next(iter(loaders()[0]))[0]
    with torch.no_grad():
        relu1 = initial.body[:2](first).numpy()                   # the first ReLU on the first batch, step 0
        probed = initial.eval().body[:2](probe_inputs[:64]).double().numpy()
    fit(module, [monitor, probe], tmp_path, steps=1)
    acc = read_events(tmp_path)
    step0 = lambda tag: {e.step: e.value for e in acc.Scalars(tag)}[0]  # noqa: E731
    assert step0("saturation/train/mean_abs/body.1") == pytest.approx(np.abs(relu1).mean(), rel=1e-5)
    assert step0("saturation/train/frac_low/body.1") == pytest.approx((np.abs(relu1) < 0.05).mean(), rel=1e-5)
    assert probe.probe.inputs.shape[0] == 64
    s = np.linalg.svd(probed, compute_uv=False)
    assert step0("condition/log10_kappa/body.1") == pytest.approx(np.log10(s[0] / s[-1]), abs=5e-4)
    w = initial.body[0].weight.detach().double().numpy()
    expected = np.linalg.norm(w, np.inf) * np.linalg.norm(np.linalg.inv(w), np.inf) if w.shape[0] == w.shape[1] else \
        np.linalg.norm(w, np.inf) * np.linalg.norm(np.linalg.pinv(w), np.inf)
    assert step0("condition/weight_log10_kappa_inf/body.0") == pytest.approx(np.log10(expected), abs=5e-4)
    with open(next((tmp_path / "tb").glob("version_*")) / "diagnostics.csv", newline="") as handle:
        table = {(r["statistic"], r["layer"]): float(r["value"]) for r in csv.DictReader(handle) if r["step"] == "0"}
    assert table[("kappa", "body.1")] == pytest.approx(s[0] / s[-1], rel=1e-3)  # the raw kappa, in the table
    assert table[("weight_kappa_inf", "body.0")] == pytest.approx(expected, rel=1e-3)
    assert table[("train/mean_abs", "body.1")] == pytest.approx(np.abs(relu1).mean(), rel=1e-5)


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
    vanished = "activations vanished \\(mean \\|a\\| < 0.05\\) in .* layer\\(s\\) at step 0: body.*"
    with pytest.warns(UserWarning, match=vanished) as w:
        trainer.fit(module, train)
    assert sum("vanished" in str(x.message) for x in w) == 1


def test_max_norm_only_after_real_optimizer_steps(tmp_path, monkeypatch):
    module = ForeignMLP(lr=5.0)  # large steps push rows past the bound
    cb = MaxNormConstraint(0.5, skip_classifier=True)
    calls, applied = [], []
    original = cb.on_train_batch_end

    def spy(trainer, *args):
        calls.append(trainer.global_step)
        original(trainer, *args)
    cb.on_train_batch_end = spy
    real = mn.apply_max_norm
    monkeypatch.setattr(mn, "apply_max_norm", lambda w, c: applied.append(1) or real(w, c))
    fit(module, [cb], tmp_path, steps=3, accumulate=2, logger=False)
    assert len(calls) == 6 and len(applied) == 3 * 4  # 6 batches, 3 optimizer steps, 4 hidden layers
    for m in module.body:
        if isinstance(m, torch.nn.Linear):
            assert (m.weight.norm(dim=1) <= 0.5 + 1e-5).all()
    assert (module.head.weight.norm(dim=1) > 0.5).any()  # classifier skipped
    assert cb.layer_names == ["body.0", "body.2", "body.4", "body.6"]


def test_one_callbacks_probe_is_not_seen_by_anothers_training_capture(tmp_path):
    saturation = ActivationSaturationMonitor(every_n_steps=1)
    fit(ForeignMLP(), [saturation, ConditionNumberProbe(every_n_steps=1)], tmp_path, steps=2, logger=False)
    assert list(saturation.last_stats) == ["body.1", "body.3", "body.5", "body.7"]


@pytest.mark.fast
@pytest.mark.parametrize("make,message", [
    (lambda: ActivationSaturationMonitor(every_n_steps=0), "every_n_steps must be a positive integer"),
    (lambda: ActivationSaturationMonitor(low=60, high=50), "need 0 <= low < high"),
    (lambda: ConditionNumberProbe(weight_norms=["fro"]), "weight_norms must be a non-empty subset"),
    (lambda: GradientFlowMonitor(max_overhead=1.5), "max_overhead must be in \\(0, 1\\)"),
    (lambda: GradientFlowMonitor(include="body.*"), "include must be a list of glob patterns"),
    (lambda: MaxNormConstraint(float("nan")), "max_norm must be a positive finite number"),
    (lambda: MaxNormConstraint(include="body.*"), "include must be a list of glob patterns"),
    (lambda: MaxNormConstraint(exclude="head"), "exclude must be a list of glob patterns"),
    (lambda: MaxNormConstraint(log_every_n_steps=True), "log_every_n_steps must be a positive integer"),
    (lambda: __import__("deepplain.callbacks", fromlist=["x"]).AlphaScheduler(include="x"),
     "include must be a list of glob patterns"),
    (lambda: ActivationSaturationMonitor(low=float("nan")), "need 0 <= low < high"),
    (lambda: ActivationSaturationMonitor(high=float("inf")), "need 0 <= low < high, both finite"),
    (lambda: ActivationSaturationMonitor(probe_size=0), "probe_size must be a positive integer"),
    (lambda: ConditionNumberProbe(near_zero_rtol=float("nan")), "near_zero_rtol must be a number in \\(0, 1\\)"),
    (lambda: ConditionNumberProbe(near_zero_rtol=0), "near_zero_rtol must be a number in \\(0, 1\\)"),
    (lambda: ConditionNumberProbe(max_rows=-5), "max_rows must be an integer >= 2"),
    (lambda: ConditionNumberProbe(probe_fn="forward"), "probe_fn must be callable"),
])
def test_bad_arguments_are_standard_exceptions(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_background_analysis_logs_what_the_training_thread_would(tmp_path):
    """ConditionNumberProbe(background=True) analyses on a worker thread: same statistics, same steps."""
    results = {}
    for background in (False, True):
        torch.manual_seed(0)
        probe = ConditionNumberProbe(every_n_steps=2, max_overhead=None, background=background, probe_size=64)
        fit(ForeignMLP(), [probe], tmp_path / str(background), steps=5)
        acc = read_events(tmp_path / str(background))
        results[background] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
                               if tag.startswith("condition/")}
        assert probe._executor is None and not probe._futures  # the worker is gone after the run
    assert results[True].keys() == results[False].keys() and results[True]
    for tag, values in results[False].items():
        assert [s for s, _ in results[True][tag]] == [s for s, _ in values] == [0, 2, 5]  # 5: after the last step
        assert [v for _, v in results[True][tag]] == pytest.approx([v for _, v in values], rel=1e-6)
