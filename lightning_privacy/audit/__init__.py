"""Measure what an attacker gets: membership inference, the one-run ε lower bound, model extraction.

A framework-neutral core (PyTorch, NumPy, SciPy, scikit-learn; no Lightning or MLflow). The faces
are ``lightning_privacy.callbacks.PrivacyAudit`` (canaries in a Lightning run) and the MLflow
evaluator ``"privacy"`` (``lightning_privacy.mlflow_plugins.evaluator``).

Example::

    from lightning_privacy import audit

    mia = audit.membership_inference(model, (x_train, y_train), (x_test, y_test), delta=1e-5)
    bound = audit.epsilon_lower_bound(canaries=1000, guesses=100, correct=92, delta=1e-5)
    report = audit.extraction(predict_logits, [100, 1000], pool=x_pool, holdout=x_test)
"""

from lightning_privacy.audit.canaries import GradientCanaries, InputCanaries
from lightning_privacy.audit.extraction import (
    SURROGATES,
    ExtractionPoint,
    ExtractionReport,
    OutputPerturbation,
    QueryBudget,
    extraction,
    synthetic_queries,
)
from lightning_privacy.audit.membership import (
    ATTACKS,
    AttackMetrics,
    attack_metrics,
    attack_scores,
    membership_inference,
    reference_models,
    roc,
)
from lightning_privacy.audit.one_run import OneRunResult, epsilon_lower_bound, one_run_audit, one_run_p_value

__all__ = [
    "ATTACKS",
    "SURROGATES",
    "AttackMetrics",
    "ExtractionPoint",
    "ExtractionReport",
    "GradientCanaries",
    "InputCanaries",
    "OneRunResult",
    "OutputPerturbation",
    "QueryBudget",
    "attack_metrics",
    "attack_scores",
    "epsilon_lower_bound",
    "extraction",
    "membership_inference",
    "one_run_audit",
    "one_run_p_value",
    "reference_models",
    "roc",
    "synthetic_queries",
]
