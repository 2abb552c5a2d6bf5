"""Membership inference: was this example in the training data?

Three attacks score each candidate (higher = "member"):

- ``loss``: minus the cross-entropy of the model on the example (Yeom et al. 2018);
- ``confidence``: the probability the model gives the true label;
- ``lira``: offline LiRA (Carlini et al. 2022): the true-label logit-confidence
  log(p / (1 − p)) standardised by its distribution under reference models that did *not* train on
  the example, trained by a caller-supplied function on other data.

:func:`attack_metrics` turns member and non-member scores into AUC, the balanced-accuracy advantage,
TPR at low FPR (bootstrap confidence intervals) and the ε those rates imply at δ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from lightning_privacy.errors import AuditConfigError

#: Attacks by name; ``lira`` needs a training function.
ATTACKS = ("loss", "confidence", "lira")
#: The FPRs at which TPR is reported (0.1 % and 1 %).
DEFAULT_FPRS = (0.001, 0.01)

Data = tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]
TrainFn = Callable[[np.ndarray, np.ndarray, int], nn.Module]


def roc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, thresholds) of "member if score ≥ threshold", over every threshold."""
    y, s = _labels_and_scores(member_scores, non_member_scores)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR of a threshold whose FPR is at most ``target`` (no interpolation)."""
    return float(tpr[fpr <= target + 1e-12].max())


@dataclass(frozen=True)
class AttackMetrics:
    """How well one attack tells members from non-members.

    Attributes:
        attack: the attack's name.
        auc: area under the ROC curve; ``auc_ci`` its bootstrap interval.
        advantage: max over thresholds of TPR − FPR (= 2 × balanced accuracy − 1); ``advantage_ci``.
        tpr_at_fpr: ``{fpr: (tpr, low, high)}`` at each reported FPR.
        epsilon_lower_bound: the ε the rates imply at ``delta``: the largest
            log((TPR − δ) / FPR) or log((1 − FPR − δ) / (1 − TPR)) at the reported FPRs, with TPR at
            its lower and FPR at its upper Clopper-Pearson limit (Bonferroni over the FPRs). The
            threshold is chosen on the same scores, so this estimates; the one-run audit certifies.
        delta: δ used above.
        member_scores, non_member_scores: the scores (for ROC plots).
    """

    attack: str
    auc: float
    auc_ci: tuple[float, float]
    advantage: float
    advantage_ci: tuple[float, float]
    tpr_at_fpr: dict[float, tuple[float, float, float]]
    epsilon_lower_bound: float
    delta: float
    member_scores: np.ndarray
    non_member_scores: np.ndarray

    def as_metrics(self, prefix: str = "mia.") -> dict[str, float]:
        """Flat MLflow metrics, e.g. ``mia.loss.auc``, ``mia.loss.tpr_at_0.1pct_fpr``."""
        p = f"{prefix}{self.attack}."
        out = {
            p + "auc": self.auc,
            p + "auc_ci_low": self.auc_ci[0],
            p + "auc_ci_high": self.auc_ci[1],
            p + "advantage": self.advantage,
            p + "epsilon_lower_bound": self.epsilon_lower_bound,
        }
        for f, (t, lo, hi) in self.tpr_at_fpr.items():
            name = f"tpr_at_{f * 100:g}pct_fpr"
            out.update({p + name: t, p + name + "_ci_low": lo, p + name + "_ci_high": hi})
        return out


def attack_metrics(
    member_scores: Sequence[float] | np.ndarray,
    non_member_scores: Sequence[float] | np.ndarray,
    *,
    attack: str = "scores",
    delta: float = 0.0,
    fprs: Sequence[float] = DEFAULT_FPRS,
    bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> AttackMetrics:
    """Metrics of an attack from its scores on members and non-members (higher = member).

    Args:
        member_scores: scores of examples that were trained on.
        non_member_scores: scores of examples that were not.
        attack: a name for the result.
        delta: δ for the implied ε.
        fprs: FPRs at which TPR is reported.
        bootstrap: resamples for the confidence intervals (0: intervals are the point value).
        confidence: level of the intervals and of the implied ε.
        seed: seed of the resampling.

    Raises:
        AuditConfigError: an empty or non-finite score set, FPRs outside (0, 1), a confidence
            outside (0, 1).
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    non_members = np.asarray(non_member_scores, dtype=np.float64).ravel()
    if len(members) == 0 or len(non_members) == 0:
        raise AuditConfigError("Membership metrics need at least one member and one non-member score.")
    if not (np.all(np.isfinite(members)) and np.all(np.isfinite(non_members))):
        raise AuditConfigError("Membership scores must be finite (a NaN or inf loss cannot be ranked).")
    if not all(0 < f < 1 for f in fprs) or not 0 < confidence < 1:
        raise AuditConfigError(
            f"FPRs and confidence must lie in (0, 1), got fprs={list(fprs)}, confidence={confidence}."
        )
    auc, advantage, tprs = _point(members, non_members, fprs)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        samples.append(_point(rng.choice(members, len(members)), rng.choice(non_members, len(non_members)), fprs))
    tail = (1 - confidence) / 2

    def interval(values: list[float], point: float) -> tuple[float, float]:
        if not values:
            return point, point
        return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))

    return AttackMetrics(
        attack=attack,
        auc=auc,
        auc_ci=interval([s[0] for s in samples], auc),
        advantage=advantage,
        advantage_ci=interval([s[1] for s in samples], advantage),
        tpr_at_fpr={f: (tprs[i], *interval([s[2][i] for s in samples], tprs[i])) for i, f in enumerate(fprs)},
        epsilon_lower_bound=_implied_epsilon(members, non_members, fprs, delta, confidence),
        delta=delta,
        member_scores=members,
        non_member_scores=non_members,
    )


def _point(members: np.ndarray, non_members: np.ndarray, fprs: Sequence[float]) -> tuple[float, float, list[float]]:
    y, s = _labels_and_scores(members, non_members)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(roc_auc_score(y, s)), float(np.max(tpr - fpr)), [tpr_at_fpr(fpr, tpr, f) for f in fprs]


def _labels_and_scores(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    members, non_members = np.asarray(members, dtype=np.float64), np.asarray(non_members, dtype=np.float64)
    return np.r_[np.ones(len(members)), np.zeros(len(non_members))], np.r_[members, non_members]


def _implied_epsilon(
    members: np.ndarray, non_members: np.ndarray, fprs: Sequence[float], delta: float, confidence: float
) -> float:
    fpr, tpr, _ = roc(members, non_members)
    n_in, n_out = len(members), len(non_members)
    # Two one-sided Clopper-Pearson limits per reported FPR, Bonferroni over all of them.
    alpha = (1 - confidence) / (2 * len(fprs))
    best = 0.0
    for target in fprs:
        i = int(np.flatnonzero(fpr <= target + 1e-12)[np.argmax(tpr[fpr <= target + 1e-12])])
        tp, fp = round(tpr[i] * n_in), round(fpr[i] * n_out)
        tpr_lo = stats.beta.ppf(alpha, tp, n_in - tp + 1) if tp > 0 else 0.0
        fpr_hi = stats.beta.ppf(1 - alpha, fp + 1, n_out - fp) if fp < n_out else 1.0
        # TPR <= e^ε FPR + δ and TNR <= e^ε FNR + δ, with each rate at its pessimistic limit.
        if tpr_lo - delta > 0:
            best = max(best, math.log((tpr_lo - delta) / fpr_hi))
        if 1 - fpr_hi - delta > 0:
            best = max(best, math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return best


# --------------------------------------------------------------------------- the attacks


def _as_tensors(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, dtype=torch.long)
    if len(x) != len(y) or len(x) == 0:
        raise AuditConfigError(f"Need as many labels as inputs, and at least one (got {len(x)} and {len(y)}).")
    return x, y


@torch.no_grad()
def true_label_log_probs(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor], data: Data, batch_size: int = 1024
) -> np.ndarray:
    """log p(y | x) under ``model`` (logits out) for each example, in eval mode."""
    x, y = _as_tensors(data)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        out = []
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size]).float()
            out.append(torch.log_softmax(logits, dim=1).gather(1, y[start : start + batch_size, None])[:, 0])
        return torch.cat(out).double().numpy()
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)


def _logit_confidence(log_p: np.ndarray) -> np.ndarray:
    # log(p / (1 - p)) computed from log p without cancellation near p = 1.
    return log_p - np.log(-np.expm1(np.minimum(log_p, -1e-12)))


def attack_scores(
    attack: str,
    model: nn.Module,
    data: Data,
    *,
    references: Sequence[nn.Module] = (),
) -> np.ndarray:
    """Per-example scores of one attack (higher = member).

    Raises:
        AuditConfigError: an unknown attack, or ``lira`` without reference models.
    """
    if attack not in ATTACKS:
        raise AuditConfigError(f"Unknown attack {attack!r}; choose from {ATTACKS}.")
    log_p = true_label_log_probs(model, data)
    if attack == "loss":
        return log_p  # = −cross-entropy
    if attack == "confidence":
        return np.exp(log_p)
    if len(references) < 2:
        raise AuditConfigError("lira needs at least 2 reference models (pass train_fn and reference_data).")
    phi = np.stack([_logit_confidence(true_label_log_probs(r, data)) for r in references])
    mu = phi.mean(axis=0)
    # Offline LiRA with few reference models: one global σ (Carlini et al., Sec. VI-B), per-example means.
    sigma = max(float(phi.std(axis=0, ddof=1).mean()), 1e-6)
    return (_logit_confidence(log_p) - mu) / sigma


def reference_models(train_fn: TrainFn, reference_data: Data, count: int = 4, seed: int = 0) -> list[nn.Module]:
    """``count`` models trained by ``train_fn(x, y, seed)`` on random halves of ``reference_data``.

    ``reference_data`` must not contain the audited members or non-members: the references stand
    for models that did not see them (the offline LiRA setting).
    """
    x, y = (np.asarray(a) for a in reference_data)
    rng = np.random.default_rng(seed)
    models = []
    for k in range(count):
        half = rng.permutation(len(x))[: len(x) // 2]
        models.append(train_fn(x[half], y[half], seed + k))
    return models


def membership_inference(
    model: nn.Module,
    members: Data,
    non_members: Data,
    *,
    attacks: Sequence[str] | None = None,
    train_fn: TrainFn | None = None,
    reference_data: Data | None = None,
    reference_count: int = 4,
    delta: float = 0.0,
    fprs: Sequence[float] = DEFAULT_FPRS,
    bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, AttackMetrics]:
    """Run membership-inference attacks on ``model`` and measure them.

    Args:
        model: a classifier returning logits.
        members: ``(x, y)`` the model was trained on.
        non_members: ``(x, y)`` from the same distribution that it was not trained on.
        attacks: names from :data:`ATTACKS`; default ``loss`` and ``confidence``, plus ``lira``
            when ``train_fn`` is given.
        train_fn: ``train_fn(x, y, seed) -> model``, the caller's training recipe, for LiRA's
            reference models.
        reference_data: ``(x, y)`` for the reference models, disjoint from members and non-members.
        reference_count: number of reference models.
        delta, fprs, bootstrap, confidence, seed: as in :func:`attack_metrics`.

    Returns:
        ``{attack: AttackMetrics}``.

    Raises:
        AuditConfigError: ``lira`` without ``train_fn`` and ``reference_data``, or bad data.

    Example::

        results = membership_inference(model, (x_train, y_train), (x_test, y_test), delta=1e-5)
        results["loss"].auc, results["loss"].tpr_at_fpr[0.001]
    """
    if attacks is None:
        attacks = ["loss", "confidence", *(["lira"] if train_fn is not None else [])]
    references: list[nn.Module] = []
    if "lira" in attacks:
        if train_fn is None or reference_data is None:
            raise AuditConfigError("The lira attack needs train_fn and reference_data to train its reference models.")
        references = reference_models(train_fn, reference_data, reference_count, seed)
    results = {}
    for attack in attacks:
        results[attack] = attack_metrics(
            attack_scores(attack, model, members, references=references),
            attack_scores(attack, model, non_members, references=references),
            attack=attack,
            delta=delta,
            fprs=fprs,
            bootstrap=bootstrap,
            confidence=confidence,
            seed=seed,
        )
    return results
