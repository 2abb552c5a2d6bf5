"""The ``privacy`` MLflow evaluator: membership inference, the one-run audit and model extraction.

Registered under the ``mlflow.model_evaluator`` entry point as ``"privacy"``; opt-in only (it runs
when its configuration names the members, which only a caller who asked for it gives)::

    mlflow.models.evaluate(
        model_uri, data=test_df, targets="label", evaluators=["privacy"],
        evaluator_config={"privacy": {"members": (x_train, y_train), "delta": 1e-5,
                                      "train_run_id": dp_run_id}},
    )

``data`` (features and targets) is the non-member set. Metrics: ``mia.<attack>.*`` (AUC with its
bootstrap interval, advantage, TPR at 0.1 % and 1 % FPR, the ε these imply), the training run's
``audit.*`` metrics and final ``epsilon`` when it has them, and ``extraction.*`` when
``extraction_budgets`` is set. Artifacts under ``privacy/``: ``roc_curve.png`` (log-scale FPR),
``canary_scores.png`` (the one-run audit's score histogram, from the ``PrivacyAudit`` callback's
``audit/canary_scores.json``), ``epsilon_vs_step.png`` (the training run's ``epsilon`` history).

A ``ckks`` model is queried as its clients query it: keys made here, inputs encrypted, logits
decrypted here (in-process, no server).

Configuration (``evaluator_config["privacy"]``):

- ``members``: ``(x, y)`` the model was trained on. Required.
- ``delta``: δ for the implied ε; default the training run's ``privacy.delta`` tag, else 0.
- ``train_run_id``: the training run (ε history, audit metrics, canary scores); default the
  evaluation run.
- ``attacks``, ``train_fn``, ``reference_data``, ``reference_count``, ``bootstrap``, ``seed``: as in
  :func:`lightning_privacy.audit.membership_inference`.
- ``extraction_budgets``, ``extraction_pool``, ``extraction_surrogate``: as in
  :func:`lightning_privacy.audit.extraction`; the held-out set is ``data``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.models.evaluation import EvaluationResult, ModelEvaluator
from mlflow.models.evaluation.artifacts import ImageEvaluationArtifact

from lightning_privacy import audit
from lightning_privacy.errors import AuditConfigError

NAME = "privacy"
#: The training run's tag that holds δ (written by the DifferentialPrivacy callback).
DELTA_TAG = "privacy.delta"
#: Where the PrivacyAudit callback leaves its canary scores in the training run.
CANARY_SCORES_ARTIFACT = "audit/canary_scores.json"
_ARTIFACT_DIR = "privacy"


def _as_array(data: Any) -> np.ndarray:
    if isinstance(data, (pd.DataFrame, pd.Series)):
        return data.to_numpy()
    return np.asarray(data)


def logits_function(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Inputs -> logits of a pyfunc model; a ``ckks`` model encrypts and decrypts here."""
    if "ckks" in model.metadata.flavors:
        from lightning_privacy import he

        compiled = model.get_raw_model()

        keys = he.Keyring(compiled, "batch")
        context = he.PublicContext.from_bytes(keys.public_context_bytes())  # what a server would hold
        chunk = compiled.max_batch_size

        def encrypted(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float64).reshape(len(x), *compiled.input_shape)
            parts = [x[start : start + chunk] for start in range(0, len(x), chunk)]
            return np.concatenate([keys.decrypt(compiled.evaluate(keys.encrypt(part), context)) for part in parts])

        return encrypted

    def plain(x: np.ndarray) -> np.ndarray:
        return np.asarray(_as_array(model.predict(np.asarray(x, dtype=np.float32))), dtype=np.float64)

    return plain


class _LogitsModel:
    """A callable module stand-in for the attacks: float tensor in, logits tensor out."""

    def __init__(self, logits: Callable[[np.ndarray], np.ndarray]) -> None:
        self.logits = logits

    def __call__(self, x: Any) -> Any:
        import torch

        return torch.as_tensor(self.logits(x.numpy()), dtype=torch.float32)


class PrivacyEvaluator(ModelEvaluator):
    """MLflow evaluator ``"privacy"``; see the module docstring for its configuration.

    Raises:
        AuditConfigError: from :meth:`evaluate`, when ``data`` has no targets.

    Example::

        mlflow.models.evaluate(model_uri, data=df, targets="label", evaluators=["privacy"],
                               evaluator_config={"privacy": {"members": (x_train, y_train)}})
    """

    name = NAME

    @classmethod
    def can_evaluate(cls, *, model_type: str | None, evaluator_config: dict[str, Any] | None, **kwargs: Any) -> bool:
        # Opt-in: MLflow offers every registered evaluator to evaluate(evaluators=None); this one
        # runs only with its own configuration.
        return isinstance(evaluator_config, dict) and "members" in evaluator_config

    def evaluate(
        self,
        *,
        model_type: str | None,
        dataset: Any,
        run_id: str,
        evaluator_config: dict[str, Any],
        model: Any = None,
        extra_metrics: Any = None,
        custom_artifacts: Any = None,
        predictions: Any = None,
        **kwargs: Any,
    ) -> EvaluationResult:
        config = dict(evaluator_config)
        if model is None:
            raise AuditConfigError("The privacy evaluator queries the model: pass a model, not only predictions.")
        if dataset.labels_data is None:
            raise AuditConfigError("The privacy evaluator needs targets in data (the non-members' labels).")
        client = mlflow.MlflowClient()
        train_run = client.get_run(config.get("train_run_id") or run_id)
        delta = float(config.get("delta", train_run.data.tags.get(DELTA_TAG, 0.0)))
        logits = logits_function(model)
        non_members = (_as_array(dataset.features_data).astype(np.float32), _as_array(dataset.labels_data))
        members = tuple(_as_array(a) for a in config["members"])
        results = audit.membership_inference(
            _LogitsModel(logits),
            (members[0].astype(np.float32), members[1]),
            non_members,
            attacks=config.get("attacks"),
            train_fn=config.get("train_fn"),
            reference_data=config.get("reference_data"),
            reference_count=int(config.get("reference_count", 4)),
            delta=delta,
            bootstrap=int(config.get("bootstrap", 200)),
            seed=int(config.get("seed", 0)),
        )
        metrics: dict[str, float] = {}
        for result in results.values():
            metrics.update(result.as_metrics())
        for key, value in train_run.data.metrics.items():
            if key.startswith("audit.") or key == "epsilon":
                metrics[key] = value
        if config.get("extraction_budgets"):
            pool = config.get("extraction_pool")
            if pool is None:
                raise AuditConfigError("extraction_budgets needs extraction_pool: the attacker's own inputs.")
            report = audit.extraction(
                logits,
                config["extraction_budgets"],
                pool=_as_array(pool),
                holdout=non_members[0],
                holdout_labels=non_members[1],
                surrogate=config.get("extraction_surrogate", "mlp"),
                seed=int(config.get("seed", 0)),
            )
            metrics.update(report.as_metrics())
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        artifacts = {}
        root = client.get_run(run_id).info.artifact_uri
        with tempfile.TemporaryDirectory() as tmp:
            figures = {"roc_curve": _roc_figure(results)}
            epsilons = client.get_metric_history(train_run.info.run_id, "epsilon")
            if epsilons:
                figures["epsilon_vs_step"] = _epsilon_figure(epsilons)
            scores = _canary_scores(client, train_run.info.run_id, tmp)
            if scores is not None:
                figures["canary_scores"] = _histogram_figure(*scores)
            for name, figure in figures.items():
                path = os.path.join(tmp, f"{name}.png")
                figure.savefig(path, dpi=100)
                client.log_artifact(run_id, path, _ARTIFACT_DIR)
                artifacts[name] = ImageEvaluationArtifact(uri=f"{root}/{_ARTIFACT_DIR}/{name}.png")
        return EvaluationResult(metrics=metrics, artifacts=artifacts, run_id=run_id)


def _roc_figure(results: dict[str, audit.AttackMetrics]) -> Figure:
    figure = Figure(figsize=(5, 4))
    ax = figure.add_subplot()
    for name, result in results.items():
        fpr, tpr, _ = audit.roc(result.member_scores, result.non_member_scores)
        ax.plot(np.maximum(fpr, 1e-5), tpr, label=f"{name} (AUC {result.auc:.3f})")
    grid = np.logspace(-5, 0, 200)  # the diagonal is a curve on a log-FPR axis
    ax.plot(grid, grid, "k:", lw=1, label="chance")
    ax.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate",
           title="Membership inference ROC")  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def _epsilon_figure(history: list[Any]) -> Figure:
    figure = Figure(figsize=(5, 3.5))
    ax = figure.add_subplot()
    points = sorted((m.step, m.value) for m in history)
    ax.plot([s for s, _ in points], [v for _, v in points], marker=".")
    ax.set(xlabel="step", ylabel="ε (accountant)", title="Privacy spent during training")
    figure.tight_layout()
    return figure


def _histogram_figure(scores: np.ndarray, included: np.ndarray) -> Figure:
    figure = Figure(figsize=(5, 3.5))
    ax = figure.add_subplot()
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[included], bins=bins, alpha=0.6, label="included canaries")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label="excluded canaries")
    ax.set(xlabel="canary score", ylabel="count", title="One-run audit: canary scores")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _canary_scores(client: mlflow.MlflowClient, run_id: str, tmp: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not any(a.path == "audit" for a in client.list_artifacts(run_id)):
        return None
    path = client.download_artifacts(run_id, CANARY_SCORES_ARTIFACT, tmp)
    with open(path) as f:
        data = json.load(f)
    return np.asarray(data["scores"], dtype=np.float64), np.asarray(data["included"], dtype=bool)
