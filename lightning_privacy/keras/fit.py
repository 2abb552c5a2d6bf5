"""DP-SGD for Keras' own ``model.fit``: :func:`make_private` and the model it returns.

The private model wraps the user's model (composition: the same layers and variables, nothing
patched) and replaces one training step with DP-SGD, in the order of Opacus' ``DPOptimizer``:
each example's gradient (book-keeping rules for Keras' Dense, Conv, Embedding and normalization
layers, exact ``stateless_call`` under vmap for any other layer with weights, :mod:`lightning_privacy.keras.fast`;
the whole model under vmap where the layers share weights,
:func:`~lightning_privacy.keras.per_sample.per_example_loss_grads`),
clipped to C over all trainable variables, summed, plus N(0, σ²C²), divided by the expected batch
size; then the compiled Keras optimizer applies it. Sampling, σ calibration, the budget and the
ledger are the engine's (:class:`~lightning_privacy.dp.DPSGDEngine`), with the arguments of the
Lightning callback, so both faces mean the same by each.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import mlflow
import numpy as np
import torch
from mlflow.utils.autologging_utils import autologging_is_disabled
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.dp import DPConfig, DPSGDEngine
from lightning_privacy.errors import PrivacyBudgetExhaustedError, PrivacyConfigError
from lightning_privacy.keras.fast import Part, clipped_sum, plan
from lightning_privacy.keras.per_sample import check_per_example, per_example_loss_grads, trainable_tensors
from lightning_privacy.privacy_tags import TAG_PREFIX


def make_private(
    model: keras.Model,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    max_grad_norm: float = 1.0,
    accountant: str = "prv",
    epochs: int | None = None,
    steps: int | None = None,
    max_epsilon: float | None = None,
    poisson_sampling: bool = True,
    loss_reduction: str = "mean",
    max_physical_batch_size: int | None = None,
    allow_large_delta: bool = False,
    log_every_n_steps: int | None = None,
    seed: int | None = None,
) -> PrivateModel:
    """``model``, ready for ``compile`` and ``fit`` with DP-SGD.

    The arguments are the Lightning callback's (:class:`lightning_privacy.callbacks.DifferentialPrivacy`),
    with the same meaning: ``epochs`` / ``steps`` plan the run for ``target_epsilon`` (``fit``'s
    ``epochs`` otherwise); ``max_physical_batch_size`` bounds how many examples' gradients are
    computed at once (memory), not the Poisson batch; ``log_every_n_steps`` also puts ε in the
    progress bar every that many steps (each epoch's end always). ``seed`` seeds the noise with a generator of its own
    (for tests); by default noise and Poisson sampling draw from torch's global generator, as the
    Lightning face does (``keras.utils.set_random_seed`` seeds it).

    ``fit(x, y, batch_size=..., epochs=...)`` takes numpy arrays (or tensors), a
    ``keras.utils.PyDataset`` (read once into memory) or a torch ``DataLoader``; each epoch draws
    Poisson batches of expected size ``batch_size`` (q = batch_size / N). ε is in the progress bar
    and in ``history.history["epsilon"]`` (one value per epoch), and, inside ``mlflow.start_run()``
    or with ``mlflow.keras.autolog()``, the MLflow metric ``epsilon`` with ``privacy.*`` params and
    tags. With ``max_epsilon``, training stops before the step that would exceed it.

    Raises:
        PrivacyConfigError: for an invalid DP argument (named in the message).
        KerasPerSampleError: the model normalises over the batch (BatchNormalization).

    Example::

        os.environ["KERAS_BACKEND"] = "torch"       # before importing keras
        import keras
        from lightning_privacy.keras import make_private

        model = make_private(keras.Sequential([...]), noise_multiplier=1.1, max_grad_norm=1.0)
        model.compile(optimizer=keras.optimizers.SGD(0.15), loss=..., metrics=["accuracy"])
        history = model.fit(x, y, epochs=5, batch_size=250)
        history.history["epsilon"]
    """
    config = DPConfig(
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        delta=delta,
        epochs=epochs,
        steps=steps,
        max_grad_norm=max_grad_norm,
        accountant=accountant,
        poisson_sampling=poisson_sampling,
        max_epsilon=max_epsilon,
        loss_reduction=loss_reduction,
        max_physical_batch_size=max_physical_batch_size,
        allow_large_delta=allow_large_delta,
    )
    if log_every_n_steps is not None and log_every_n_steps <= 0:
        raise PrivacyConfigError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps}.")
    return PrivateModel(model, config, seed=seed, log_every_n_steps=log_every_n_steps)


class PrivateModel(keras.Model):
    """A Keras model trained with DP-SGD by ``fit``; built by :func:`make_private`.

    It calls the wrapped model (``self.inner``; same layers and variables), so ``predict``,
    ``evaluate``, ``save_weights`` and ``export`` work as on the original.

    Args:
        model: the user's Keras model (torch backend).
        config: the DP configuration.
        seed: seeds the noise with a generator of its own; ``None``: torch's global generator.
        log_every_n_steps: ε in the progress bar every that many steps (else at each epoch's end).

    Raises:
        KerasPerSampleError: the model normalises over the batch (BatchNormalization).

    Example::

        private = PrivateModel(model, DPConfig(noise_multiplier=1.0))   # or make_private(model, ...)
    """

    def __init__(
        self,
        model: keras.Model,
        config: DPConfig,
        seed: int | None = None,
        log_every_n_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=kwargs.pop("name", f"{model.name}_private"), **kwargs)
        check_per_example(model)
        self.inner = model
        self.dp_config = config
        # Physical batches here bound the vmapped chunk; the engine sees whole Poisson batches.
        self.privacy_engine = DPSGDEngine(dataclasses.replace(config, max_physical_batch_size=None))
        # As the engine's optimizers (Opacus, secure_mode off): torch's global generator unless seeded.
        self._generator: torch.Generator | None = None
        if seed is not None:
            self._generator = torch.Generator()
            self._generator.manual_seed(seed)
        self.log_every_n_steps = log_every_n_steps
        #: The parts of the book-keeping step (rule layers and exact ones; None: the whole model exactly).
        self.parts: list[Part] | None = plan(model)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.inner(inputs, training=training)

    @property
    def epsilon(self) -> float:
        """ε spent so far, at the config's δ."""
        return self.privacy_engine.epsilon()

    # ------------------------------------------------------------------ data

    def _loader(self, x: Any, y: Any, batch_size: int | None) -> DataLoader:
        if isinstance(x, DataLoader):
            if y is not None:
                raise PrivacyConfigError("With a DataLoader, give the targets inside it (y must be None).")
            return x
        if isinstance(x, keras.utils.PyDataset):
            batches = [x[i] for i in range(len(x))]
            if not batches:
                raise PrivacyConfigError("The PyDataset is empty.")
            batch_size = batch_size or len(batches[0][0])
            x = np.concatenate([np.asarray(b[0]) for b in batches])
            y = np.concatenate([np.asarray(b[1]) for b in batches])
        if y is None:
            raise PrivacyConfigError(
                "DP-SGD in fit needs the examples one by one: give x and y as arrays, a keras.utils.PyDataset "
                "of (x, y) batches, or a torch DataLoader."
            )
        dataset = _Rows(torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y)))
        return DataLoader(dataset, batch_size=batch_size or 32, collate_fn=_gathered)

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        epochs: int = 1,
        callbacks: list[keras.callbacks.Callback] | None = None,
        **kwargs: Any,
    ) -> keras.callbacks.History:
        """Keras' ``fit`` on Poisson-sampled batches of expected size ``batch_size``, with DP-SGD.

        Raises:
            PrivacyConfigError: for ``sample_weight``/``class_weight``/``steps_per_epoch``
                (they change what one example contributes or the sampling), or data that is not
                arrays, a PyDataset or a DataLoader.
        """
        for name in ("sample_weight", "class_weight", "steps_per_epoch"):
            if kwargs.get(name) is not None:
                raise PrivacyConfigError(
                    f"fit({name}=...) is not supported with DP-SGD: each step is a Poisson sample of the data "
                    "and every example counts once, clipped to max_grad_norm."
                )
            kwargs.pop(name, None)
        kwargs.pop("shuffle", None)  # Poisson sampling draws each batch afresh
        if self.loss is None or isinstance(self.loss, list | dict):
            raise PrivacyConfigError("Compile the private model with one loss (model.compile(loss=...)) before fit.")
        self.parts = plan(self.inner)
        engine = self.privacy_engine
        loader = engine.private_loader(self._loader(x, y, batch_size), planned_epochs=epochs)
        if engine.remaining_steps <= 0:
            raise PrivacyBudgetExhaustedError(
                f"max_epsilon={self.dp_config.max_epsilon} allows no further private step at "
                f"noise_multiplier={engine.plan.noise_multiplier:.4g}, sample_rate={engine.plan.sample_rate:.4g}."
            )
        log = PrivacyLog(self.log_every_n_steps)  # first: the user's callbacks see epsilon in the logs
        return super().fit(loader, epochs=epochs, shuffle=False, callbacks=[log, *(callbacks or [])], **kwargs)

    # ------------------------------------------------------------------ the private step

    def _example_loss(self, y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        # On a batch of one: that example's loss (Keras' reductions average over the batch).
        return keras.losses.get(self.loss)(y_true, y_pred)

    def _clipped_sum_in_chunks(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None:
        """:func:`clipped_sum` over physical batches of at most ``max_physical_batch_size`` examples
        (each example is clipped on its own, so the chunks' sums add up); ``None``: take the exact path."""
        step = self.dp_config.max_physical_batch_size or x.shape[0]
        summed, losses, preds = None, [], []
        for start in range(0, x.shape[0], step):
            part = clipped_sum(
                self.inner, self.parts, self.loss, x[start : start + step], y[start : start + step],
                self.dp_config.max_grad_norm,
            )  # fmt: skip
            if part is None:
                return None
            summed = part[0] if summed is None else [a + b for a, b in zip(summed, part[0], strict=True)]
            losses.append(part[1])
            preds.append(part[2])
        return summed, torch.cat(losses), torch.cat(preds)

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise PrivacyConfigError("Sample weights are not supported with DP-SGD (each example counts once).")
        engine, config = self.privacy_engine, self.dp_config
        plan = engine.plan
        if engine.remaining_steps <= 0:
            raise PrivacyBudgetExhaustedError(
                f"Step {engine.steps + 1} would exceed max_epsilon={config.max_epsilon}; fit stops before it."
            )
        params = trainable_tensors(self)
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        n = x.shape[0]
        preds = None
        fast = None
        if n and self.parts is not None:
            fast = self._clipped_sum_in_chunks(x, y)
        if fast is not None:
            summed, losses, preds = fast
        elif n:
            grads, losses, preds = per_example_loss_grads(
                self.inner, self._example_loss, x, y, chunk=config.max_physical_batch_size
            )
            sq = sum(g.reshape(n, -1).double().square().sum(1) for g in grads)
            factor = (config.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            summed = [torch.einsum("i,i...->...", factor.to(g.dtype), g) for g in grads]
        else:
            summed = [torch.zeros_like(p) for p in params]
        std = plan.noise_multiplier * config.max_grad_norm
        noisy = [
            s + torch.normal(0.0, std, p.shape, generator=self._generator).to(p)
            for s, p in zip(summed, params, strict=True)
        ]
        scale = plan.expected_batch_size if config.loss_reduction == "mean" else 1.0
        update = [g / scale for g in noisy]
        engine.ledger.record(plan.noise_multiplier, plan.sample_rate)
        with torch.no_grad():
            self.optimizer.apply(update, self.trainable_variables)
        if n:
            self._loss_tracker.update_state(losses.mean(), sample_weight=n)
            return self.compute_metrics(x, y, preds, sample_weight=None)
        return self.get_metrics_result()


class _Rows(TensorDataset):
    """In-memory examples whose batch is gathered by one indexing per tensor (the DataLoader's
    ``__getitems__``), not one ``__getitem__`` per example and a stack: per-example fetching cost
    more than the digits MLP's whole plain ``fit`` step (1.9 of 1.6 ms)."""

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return [tuple(t[rows] for t in self.tensors)]


def _gathered(batch: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The collate function of :class:`_Rows`: its one gathered batch (empty ones included)."""
    return batch[0]


class PrivacyLog(keras.callbacks.Callback):
    """ε into Keras' logs (progress bar, ``history.history["epsilon"]``) and, in an MLflow run, the
    ``epsilon`` metric with ``privacy.*`` params and tags; stops ``fit`` before the budget is exceeded.

    Added by :meth:`PrivateModel.fit`; with ``mlflow.keras.autolog()`` the autolog callback logs
    ``epsilon`` from the epoch logs, so this one logs the metric only without autolog.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._cached: tuple[int, float] | None = None

    def _epsilon(self) -> float:
        engine = self.model.privacy_engine
        if self._cached is None or self._cached[0] != engine.steps:
            self._cached = (engine.steps, engine.epsilon() if engine.steps else 0.0)
        return self._cached[1]

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        engine, config = self.model.privacy_engine, self.model.dp_config
        if mlflow.active_run() is not None:
            params = {
                **engine.plan.as_params(),
                "max_grad_norm": config.max_grad_norm,
                "delta": config.delta,
                "accountant": config.accountant,
                "grad_sample_mode": "keras_exact",
                "max_physical_batch_size": config.max_physical_batch_size,
            }
            mlflow.log_params({TAG_PREFIX + k: v for k, v in params.items()})

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # The progress bar reads the step's logs; PRV's ε costs ~0.1-1 s, so not every step by default.
        steps = self.model.privacy_engine.steps
        if logs is not None and self.every_n_steps and steps % self.every_n_steps == 0:
            logs["epsilon"] = self._epsilon()
        if self.model.privacy_engine.remaining_steps <= 0:
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        eps = self._epsilon()
        if logs is not None:
            logs["epsilon"] = eps
        if mlflow.active_run() is not None and autologging_is_disabled("keras") and math.isfinite(eps):
            mlflow.log_metric("epsilon", eps, step=epoch)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        engine, config = self.model.privacy_engine, self.model.dp_config
        if mlflow.active_run() is None:
            return
        tags = {
            "epsilon": self._epsilon(),
            "delta": config.delta,
            "steps": engine.steps,
            "noise_multiplier": engine.plan.noise_multiplier,
            "max_grad_norm": config.max_grad_norm,
            "accountant": config.accountant,
        }
        mlflow.set_tags({TAG_PREFIX + k: str(v) for k, v in tags.items()})
