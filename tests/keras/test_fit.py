"""``make_private(model).fit``: one DP step against an explicit per-sample loop, the noise, ε
against Opacus' accountant, the budget, the data kinds, MLflow, and the backend error."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_privacy.dp import DPConfig  # noqa: E402
from lightning_privacy.errors import KerasPerSampleError  # noqa: E402
from lightning_privacy.keras import PrivateModel, fast, fit, make_private  # noqa: E402
from tests.keras.models import EXACT_LAYERS, KINDS, build, reference_clipped_mean  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _recording(fn, seen):
    """``fn``, noting the layer of each call (the exact path's per-layer vmap)."""

    def wrapped(layer, *args, **kwargs):
        seen.append(layer)
        return fn(layer, *args, **kwargs)

    return wrapped


def _planned(model, x, y, dataset_factor=4, **dp):
    """The private model, compiled with SGD(lr=1), planned on ``dataset_factor``× the batch (q = 1/factor)."""
    private = make_private(model, **dp)
    private.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
    big = TensorDataset(
        torch.as_tensor(np.concatenate([x] * dataset_factor)), torch.as_tensor(np.concatenate([y] * dataset_factor))
    )
    private.privacy_engine.private_loader(DataLoader(big, batch_size=len(x)))
    return private


def _update(private, x, y, seed):
    """``w_before - w_after`` of one train_step with the noise seeded, the weights restored after."""
    before = [v.value.detach().clone() for v in private.trainable_variables]
    torch.manual_seed(seed)  # the noise draws from torch's global generator
    private.train_step((x, y))
    delta = [b - v.value.detach() for b, v in zip(before, private.trainable_variables, strict=True)]
    for v, b in zip(private.trainable_variables, before, strict=True):
        v.assign(b)
    return delta


@pytest.mark.parametrize("kind", KINDS)
def test_one_fit_step_equals_the_per_sample_loop(kind, monkeypatch):
    """Book-keeping rules for Keras' layers, the exact vmap path for a custom layer's weights only;
    the whole-model vmap path is never taken (it would raise here)."""
    model, x, y = build(kind)
    _, norms = reference_clipped_mean(model, x, y, 1e9, 1.0)
    clip = float(norms.median())  # about half the examples are clipped
    expected, _ = reference_clipped_mean(model, x, y, clip, len(x))
    private = _planned(model, x, y, noise_multiplier=0.7, max_grad_norm=clip, accountant="rdp")
    exact = {type(part.layer).__name__ for part in private.parts if part.rule is None}
    assert exact == EXACT_LAYERS.get(kind, set())
    vmapped = []
    monkeypatch.setattr(fit, "per_example_loss_grads", lambda *a, **k: pytest.fail("whole-model vmap path taken"))
    monkeypatch.setattr(fast, "per_example_vjp", _recording(fast.per_example_vjp, vmapped))
    with_batch = _update(private, x, y, seed=11)
    noise_only = _update(private, x[:0], y[:0], seed=11)  # the same noise, no example
    diffs = [
        float(((a - b).double() - e).abs().max()) for a, b, e in zip(with_batch, noise_only, expected, strict=True)
    ]
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 1e-3  # the check compares something
    assert max(diffs) < 1e-5, (kind, diffs)
    assert {type(layer).__name__ for layer in vmapped} == EXACT_LAYERS.get(kind, set())
    noise = torch.cat([n.reshape(-1) for n in noise_only])
    assert float(noise.abs().max()) > 0  # the step did add noise


def test_noise_std_is_sigma_c_over_b_on_a_zero_gradient_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64), keras.layers.Dense(32)])
    x = np.random.default_rng(0).normal(size=(20, 64)).astype("float32")
    y = np.zeros(20, dtype="int64")
    private = make_private(model, noise_multiplier=1.3, max_grad_norm=0.8, accountant="rdp")
    private.compile(optimizer=keras.optimizers.SGD(1.0), loss=lambda yt, yp: 0.0 * keras.ops.sum(yp, axis=-1))
    private.privacy_engine.private_loader(
        DataLoader(
            TensorDataset(torch.as_tensor(np.concatenate([x] * 5)), torch.as_tensor(np.concatenate([y] * 5))),
            batch_size=20,
        )
    )
    update = torch.cat([u.reshape(-1) for u in _update(private, x, y, seed=1)])
    expected = 1.3 * 0.8 / 20
    ratio = float(update.std()) / expected
    assert update.numel() > 6000
    assert 0.95 < ratio < 1.05, ratio
    assert abs(float(update.mean())) < 4 * expected / update.numel() ** 0.5


def _data(n=60, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")


def _mlp(d=5):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])


def test_fit_epsilon_per_epoch_equals_an_independent_opacus_accountant():
    x, y = _data()
    private = make_private(_mlp(), noise_multiplier=1.1, max_grad_norm=1.0, accountant="rdp", delta=1e-3)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    history = private.fit(x, y, batch_size=12, epochs=2, verbose=0)
    plan = private.privacy_engine.plan
    assert plan.sample_rate == pytest.approx(12 / 60)
    accountant = RDPAccountant()
    per_epoch = []
    for _ in range(2):
        for _ in range(plan.steps_per_epoch):
            accountant.step(noise_multiplier=1.1, sample_rate=plan.sample_rate)
        per_epoch.append(accountant.get_epsilon(1e-3))
    assert history.history["epsilon"] == pytest.approx(per_epoch, rel=1e-9)
    assert private.epsilon == pytest.approx(per_epoch[-1], rel=1e-9)
    assert len(history.history["accuracy"]) == 2


def test_budget_stops_fit_before_exceeding():
    x, y = _data()
    probe = RDPAccountant()
    for _ in range(7):
        probe.step(noise_multiplier=1.0, sample_rate=0.2)
    budget = probe.get_epsilon(1e-3) * 1.0001  # 7 steps fit, the 8th would not
    private = make_private(_mlp(), noise_multiplier=1.0, accountant="rdp", delta=1e-3, max_epsilon=budget)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    history = private.fit(x, y, batch_size=12, epochs=4, verbose=0)
    assert private.privacy_engine.steps == 7
    assert private.epsilon <= budget
    assert len(history.history["epsilon"]) == 2  # stopped in the second epoch


def test_fit_takes_pydataset_and_dataloader():
    x, y = _data()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return x[12 * i : 12 * (i + 1)], y[12 * i : 12 * (i + 1)]

    for data in (Batches(), DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=12)):
        private = make_private(_mlp(), noise_multiplier=1.0, accountant="rdp", delta=1e-3)
        private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        history = private.fit(data, epochs=1, verbose=0)
        assert private.privacy_engine.plan.sample_rate == pytest.approx(0.2)
        assert private.privacy_engine.plan.dataset_size == 60
        assert private.privacy_engine.steps == 5
        assert len(history.history["epsilon"]) == 1


def test_mlflow_inside_a_run_and_with_autolog():
    x, y = _data()
    for autolog in (False, True):
        private = make_private(_mlp(), noise_multiplier=1.0, accountant="rdp", delta=1e-3)
        private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        if autolog:
            mlflow.keras.autolog(log_models=False, log_datasets=False)
            try:
                private.fit(x, y, batch_size=12, epochs=2, verbose=0)
            finally:
                mlflow.keras.autolog(disable=True)
            run = mlflow.last_active_run()
        else:
            with mlflow.start_run() as active:
                private.fit(x, y, batch_size=12, epochs=2, verbose=0)
            run = mlflow.get_run(active.info.run_id)
        run = mlflow.get_run(run.info.run_id)
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "epsilon")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(_epsilons(private, 2)), autolog
        assert run.data.params["privacy.noise_multiplier"] == "1.0"
        assert float(run.data.params["privacy.sample_rate"]) == pytest.approx(0.2)
        assert float(run.data.tags["privacy.epsilon"]) == pytest.approx(private.epsilon)
        assert run.data.tags["privacy.accountant"] == "rdp"


def _epsilons(private, epochs):
    accountant = RDPAccountant()
    plan = private.privacy_engine.plan
    out = []
    for _ in range(epochs):
        for _ in range(plan.steps_per_epoch):
            accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        out.append(accountant.get_epsilon(1e-3))
    return out


def test_batch_normalization_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.BatchNormalization()])
    with pytest.raises(KerasPerSampleError, match="GroupNormalization"):
        make_private(model, noise_multiplier=1.0)


def test_another_backend_is_a_clear_error():
    code = "import os; os.environ['KERAS_BACKEND'] = 'jax'; import lightning_privacy.keras"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "KerasBackendError" in out.stderr
    assert "KERAS_BACKEND=torch" in out.stderr


def test_without_a_chosen_backend_the_face_selects_torch(tmp_path):
    (tmp_path / "keras.json").write_text('{"backend": "tensorflow"}')  # what Keras writes on first import
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"} | {"KERAS_HOME": str(tmp_path)}
    code = "import lightning_privacy.keras, keras; print(keras.config.backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "torch"


def test_epsilon_in_the_step_logs_the_progress_bar_shows():
    x, y = _data()
    seen = []

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs.get("epsilon"))

    private = make_private(_mlp(), noise_multiplier=1.0, accountant="rdp", delta=1e-3, log_every_n_steps=2)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    private.fit(x, y, batch_size=12, epochs=1, verbose=0, callbacks=[Watch()])
    accountant = RDPAccountant()
    expected = []
    for step in range(1, len(seen) + 1):
        accountant.step(noise_multiplier=1.0, sample_rate=0.2)
        expected.append(accountant.get_epsilon(1e-3) if step % 2 == 0 else None)
    assert seen == [pytest.approx(e, rel=1e-9) if e is not None else None for e in expected]


class _CountingPrivateModel(PrivateModel):
    """The private model, noting the size of each Poisson batch its train_step gets (for the test)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_sizes = []

    def train_step(self, data):
        self.batch_sizes.append(int(np.asarray(data[0]).shape[0]))
        return super().train_step(data)


class _Weights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.after_each = []

    def on_train_begin(self, logs=None):
        weights = [v.value.detach().reshape(-1).clone() for v in self.model.trainable_variables]
        self.after_each.append(torch.cat(weights))

    def on_train_batch_end(self, batch, logs=None):
        self.on_train_begin()


def test_empty_poisson_batches_in_fit_are_steps_with_noise():
    """q = 1/30: about a third of the Poisson batches are empty. Each is still a step of the
    accountant (ε equals Opacus' RDP accountant stepped once per batch) and still adds noise."""
    x, y = _data(n=30)
    keras.utils.set_random_seed(3)
    private = _CountingPrivateModel(_mlp(), DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"))
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
    weights = _Weights()
    history = private.fit(x, y, batch_size=1, epochs=1, verbose=0, callbacks=[weights])
    sizes = private.batch_sizes
    assert len(sizes) == 30 and sizes.count(0) >= 3 and max(sizes) >= 1
    assert private.privacy_engine.steps == len(sizes)
    accountant = RDPAccountant()
    for _ in sizes:
        accountant.step(noise_multiplier=1.0, sample_rate=1 / 30)
    assert history.history["epsilon"] == pytest.approx([accountant.get_epsilon(1e-5)], rel=1e-9)
    steps = list(zip(weights.after_each, weights.after_each[1:], strict=False))
    assert len(steps) == len(sizes)
    for (before, after), n in zip(steps, sizes, strict=True):
        assert not torch.equal(before, after), n  # an empty batch's update is the noise alone
    assert np.isfinite(history.history["loss"]).all()


def test_a_dense_layer_with_lora_takes_the_exact_path_and_stays_exact(monkeypatch):
    """LoRA changes what Dense computes (and which variables train): no rule covers it, the exact
    per-layer path does, and the step still equals the per-sample loop."""
    model, x, y = build("dense")
    model.layers[0].enable_lora(2)
    keras.utils.set_random_seed(1)
    for v in model.layers[0].trainable_variables:
        v.assign(torch.randn(v.shape) * 0.3)  # lora_kernel_b starts at zero
    _, norms = reference_clipped_mean(model, x, y, 1e9, 1.0)
    clip = float(norms.median())
    expected, _ = reference_clipped_mean(model, x, y, clip, len(x))
    private = _planned(model, x, y, noise_multiplier=0.7, max_grad_norm=clip, accountant="rdp")
    assert [part.rule is None for part in private.parts] == [True, False]
    vmapped = []
    monkeypatch.setattr(fast, "per_example_vjp", _recording(fast.per_example_vjp, vmapped))
    with_batch = _update(private, x, y, seed=11)
    noise_only = _update(private, x[:0], y[:0], seed=11)
    assert vmapped == [model.layers[0]]
    steps = zip(with_batch, noise_only, expected, strict=True)
    diffs = [float(((a - b).double() - e).abs().max()) for a, b, e in steps]
    assert max(float(e.abs().max()) for e in expected) > 1e-3
    assert max(diffs) < 1e-5, diffs


@pytest.mark.parametrize("kind", ["mixed", "conv"])
def test_physical_batches_equal_the_per_sample_loop(kind, monkeypatch):
    """max_physical_batch_size=5 on 12 examples: chunks of 5, 5 and 2, each clipped per example by
    the rules; their sum is the step of the whole batch."""
    model, x, y = build(kind)
    _, norms = reference_clipped_mean(model, x, y, 1e9, 1.0)
    clip = float(norms.median())
    expected, _ = reference_clipped_mean(model, x, y, clip, len(x))
    private = _planned(model, x, y, noise_multiplier=0.7, max_grad_norm=clip, max_physical_batch_size=5)
    monkeypatch.setattr(fit, "per_example_loss_grads", lambda *a, **k: pytest.fail("whole-model vmap path taken"))
    chunks = []
    monkeypatch.setattr(fit, "clipped_sum", _recording(fit.clipped_sum, chunks))
    with_batch = _update(private, x, y, seed=5)
    noise_only = _update(private, x[:0], y[:0], seed=5)
    assert len(chunks) == 3
    steps = zip(with_batch, noise_only, expected, strict=True)
    diffs = [float(((a - b).double() - e).abs().max()) for a, b, e in steps]
    assert max(diffs) < 1e-5, diffs
