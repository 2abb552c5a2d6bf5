"""Canaries for the one-run audit: each is included in training with probability ½, then scored.

- :class:`InputCanaries`: extra training examples (random inputs with random labels, or the
  caller's); the score is minus the final model's loss on each (black box, last model only).
- :class:`GradientCanaries`: crafted per-sample gradients of norm C added to the clipped sum of the
  private step. Each canary is a "Dirac" gradient (one coordinate of the flattened trainable
  parameters, a different one per canary); an included canary takes part in each step with the
  sampling rate q, like any example, so the run's (ε, δ) covers it. The auditor sees the released
  (noised) gradient of every step, the white-box view of Steinke et al.

Scoring gradient canaries: the plain sum over steps along a canary's coordinate (``"sum"``) is
swamped on small models by the real gradient's drift on that coordinate (measured on a digits MLP
with 4810 parameters: drift s.d. 27 against a signal of q·T·C = 10). The default ``"spikes"`` score
looks for the canary's footprint instead, a jump of C in the steps that sample it: the squared
second difference d_t = v_t − (v_{t−1} + v_{t+1}) / 2 of the released values, summed over steps and
divided by its median over steps (each coordinate's own noise level). Any score is a
post-processing of the released gradients, so either keeps the bound valid; on that MLP with the
noise cut to σ = 0.1 the spike score gives ε ≥ 3.9 where the sum gives 0.65.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from lightning_privacy.audit.membership import true_label_log_probs
from lightning_privacy.audit.one_run import OneRunResult, one_run_audit
from lightning_privacy.errors import AuditConfigError


def _coin_flips(count: int, seed: int) -> np.ndarray:
    if count < 1:
        raise AuditConfigError(f"An audit needs at least one canary, got {count}.")
    return np.random.default_rng(seed).random(count) < 0.5


class InputCanaries:
    """Canary training examples, each included with probability ½.

    Args:
        inputs: canary inputs, shape ``(m, *input_shape)``.
        labels: their labels (class indices), shape ``(m,)``.
        seed: seed of the inclusion coin flips.

    Raises:
        AuditConfigError: no canaries, or inputs and labels of different lengths.

    Example::

        canaries = InputCanaries.random(500, like=x_train, num_classes=10)
        train = canaries.dataset(TensorDataset(x_train, y_train))   # + the included canaries
        ...  # train privately on `train`
        result = canaries.audit(model, delta=1e-5)
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> None:
        self.inputs = torch.as_tensor(inputs, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.inputs) != len(self.labels):
            raise AuditConfigError(f"{len(self.inputs)} canary inputs but {len(self.labels)} labels.")
        self.included = _coin_flips(len(self.inputs), seed)

    @classmethod
    def random(cls, count: int, like: torch.Tensor | np.ndarray, num_classes: int, seed: int = 0) -> InputCanaries:
        """``count`` canaries with inputs uniform over the per-feature range of ``like`` (some real
        inputs) and uniformly random labels: outliers a model can only fit by memorising them."""
        like = torch.as_tensor(np.asarray(like), dtype=torch.float32)
        if num_classes < 2 or len(like) == 0:
            raise AuditConfigError(
                "Random canaries need num_classes >= 2 and a few real inputs to take the range from."
            )
        g = torch.Generator().manual_seed(seed)
        low, high = like.min(dim=0).values, like.max(dim=0).values
        inputs = low + (high - low) * torch.rand((count, *like.shape[1:]), generator=g)
        labels = torch.randint(0, num_classes, (count,), generator=g)
        return cls(inputs, labels, seed=seed)

    def __len__(self) -> int:
        return len(self.inputs)

    def included_dataset(self) -> TensorDataset:
        """The included canaries as ``(input, label)`` pairs."""
        mask = torch.from_numpy(self.included)
        return TensorDataset(self.inputs[mask], self.labels[mask])

    def dataset(self, base: Dataset) -> ConcatDataset:
        """``base`` followed by the included canaries (``base`` must yield ``(input, label)`` pairs)."""
        return ConcatDataset([base, self.included_dataset()])

    def scores(self, model: nn.Module) -> np.ndarray:
        """Minus each canary's cross-entropy under ``model`` (higher = more likely trained on)."""
        return true_label_log_probs(model, (self.inputs, self.labels))

    def audit(
        self,
        model: nn.Module,
        *,
        delta: float = 0.0,
        guesses: int | Sequence[int] | None = None,
        confidence: float = 0.95,
    ) -> OneRunResult:
        """The one-run ε lower bound from ``model``'s losses on the canaries."""
        return one_run_audit(self.scores(model), self.included, delta=delta, guesses=guesses, confidence=confidence)


class GradientCanaries:
    """Dirac gradient canaries for the parameters of one private optimizer.

    Use it around each private step, after the noise is added and before the parameters change:
    :meth:`insert` adds the canaries that this step samples to the released gradient, then
    :meth:`observe` records the released value along every canary's coordinate. Adding after the noise equals adding
    before it (the noise is independent of the sum); ``scale`` is what the optimizer multiplied the
    noised sum by (1 / expected batch size for a mean loss).

    Args:
        params: the trainable parameters the step updates (their order fixes the coordinates).
        count: m, the number of canaries (at most the number of coordinates).
        norm: each canary gradient's norm: the clipping bound C, the most any example contributes.
        sample_rate: q, the probability that an included canary takes part in a step.
        seed: seed of the coordinates, the inclusion flips and the per-step sampling.

    Raises:
        AuditConfigError: more canaries than coordinates, or a rate outside (0, 1].

    Example::

        canaries = GradientCanaries(trainable_params, count=1000, norm=1.0, sample_rate=q)
        # in the private step, after noise and scaling:
        canaries.insert(scale=1 / expected_batch_size); canaries.observe(scale=1 / expected_batch_size)
        result = canaries.audit(delta=1e-5)
    """

    def __init__(
        self, params: Sequence[torch.Tensor], count: int, norm: float, sample_rate: float, seed: int = 0
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        sizes = [p.numel() for p in self.params]
        dim = sum(sizes)
        if count > dim:
            raise AuditConfigError(
                f"{count} gradient canaries need as many distinct coordinates, but the model has {dim} trainable "
                "parameters. Use fewer canaries (or input canaries)."
            )
        if not 0 < sample_rate <= 1:
            raise AuditConfigError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        self.included = _coin_flips(count, seed)
        self.norm = float(norm)
        self.sample_rate = float(sample_rate)
        self.steps = 0
        self._rng = np.random.default_rng([seed, 1])
        coords = self._rng.choice(dim, size=count, replace=False)
        offsets = np.cumsum([0, *sizes])
        # (parameter index, flat index within it) of each canary
        self._param_of = np.searchsorted(offsets, coords, side="right") - 1
        self._flat_of = coords - offsets[self._param_of]
        self._history: list[np.ndarray] = []  # released value along each canary's coordinate, per step

    def __len__(self) -> int:
        return len(self.included)

    @property
    def released(self) -> np.ndarray:
        """The released values observed so far along the canaries' coordinates, ``(steps, canaries)``."""
        return np.stack(self._history) if self._history else np.zeros((0, len(self.included)), np.float32)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this audit: the inclusion draws (to check), the
        per-step sampling generator, and the released values observed so far (tensors and Python
        numbers only, so checkpoints load with ``torch.load(weights_only=True)``)."""
        return {
            "included": torch.from_numpy(self.included.copy()),
            "norm": self.norm,
            "sample_rate": self.sample_rate,
            "dim": int(sum(p.numel() for p in self.params)),
            "steps": self.steps,
            "rng": self._rng.bit_generator.state,
            "history": torch.from_numpy(self.released),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the audit saved by :meth:`state_dict`.

        Raises:
            AuditConfigError: the saved audit had other canaries (count, seed), another clipping
                bound or sampling rate, or a model with another number of trainable parameters.
        """
        saved = {k: state[k] for k in ("norm", "sample_rate", "dim")}
        mine = {"norm": self.norm, "sample_rate": self.sample_rate, "dim": int(sum(p.numel() for p in self.params))}
        same_canaries = np.array_equal(np.asarray(state["included"]), self.included)
        if saved != mine or not same_canaries:
            raise AuditConfigError(
                f"The checkpoint's gradient canaries do not fit this run (saved {saved}, "
                f"{len(state['included'])} canaries; this run {mine}, {len(self.included)} canaries"
                f"{'' if same_canaries else ', other inclusion draws: another count or seed'}). Resume with the "
                "PrivacyAudit settings, model and DifferentialPrivacy settings of the checkpointed run."
            )
        self.steps = int(state["steps"])
        self._rng.bit_generator.state = state["rng"]
        self._history = list(np.asarray(state["history"], dtype=np.float32))

    def _groups(self) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        out = []
        for i, p in enumerate(self.params):
            which = np.flatnonzero(self._param_of == i)
            if len(which):
                out.append((p, which, self._flat_of[which]))
        return out

    @torch.no_grad()
    def insert(self, scale: float) -> None:
        """Add ``norm × scale`` at the coordinate of each included canary this step samples (rate q)."""
        sampled = self.included & (self._rng.random(len(self.included)) < self.sample_rate)
        for p, which, flat in self._groups():
            take = sampled[which]
            if not take.any():
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.view(-1)[torch.from_numpy(flat[take])] += self.norm * scale
        self.steps += 1

    @torch.no_grad()
    def observe(self, scale: float) -> None:
        """Record the released gradient along each canary's coordinate, in clipped-sum units."""
        values = np.zeros(len(self.included))
        for p, which, flat in self._groups():
            if p.grad is not None:
                values[which] = p.grad.reshape(-1)[torch.from_numpy(flat)].double().cpu().numpy() / scale
        self._history.append(values.astype(np.float32))

    def scores(self, kind: str = "spikes") -> np.ndarray:
        """Each canary's score from the steps observed so far (higher = more likely included).

        Args:
            kind: ``"spikes"`` (default; needs 3 observed steps) or ``"sum"`` (see the module docstring).

        Raises:
            AuditConfigError: an unknown kind, or too few observed steps.
        """
        if kind not in ("spikes", "sum"):
            raise AuditConfigError(f"Unknown gradient-canary score {kind!r}; use 'spikes' or 'sum'.")
        need = 3 if kind == "spikes" else 1
        if len(self._history) < need:
            raise AuditConfigError(
                f"{len(self._history)} private step(s) observed; the {kind!r} score needs at least {need}. "
                "Train longer."
            )
        v = np.stack(self._history).astype(np.float64)
        if kind == "sum":
            return v.sum(axis=0)
        d2 = (v[1:-1] - (v[:-2] + v[2:]) / 2) ** 2
        return d2.sum(axis=0) / (np.median(d2, axis=0) + 1e-12 * self.norm**2)

    def audit(
        self,
        *,
        delta: float = 0.0,
        guesses: int | Sequence[int] | None = None,
        confidence: float = 0.95,
        score: str = "spikes",
    ) -> OneRunResult:
        """The one-run ε lower bound from the scores of the steps observed so far."""
        return one_run_audit(self.scores(score), self.included, delta=delta, guesses=guesses, confidence=confidence)
