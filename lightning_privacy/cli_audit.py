"""``lightning-privacy audit``: the ``privacy`` MLflow evaluator on a logged model and a dataset split.

Part of the command-line face (:mod:`lightning_privacy.cli` registers it). The evaluator is found by
name through MLflow's ``mlflow.model_evaluator`` entry point, so this module imports no other face::

    lightning-privacy audit --model-uri models:/digits-ckks/1 --members train.csv \\
        --non-members test.csv --target label --delta 1e-5 --train-run-id RUN_ID

Metrics (``mia.*``, the training run's ``audit.*``, ``extraction.*``) and PNGs go to an MLflow run
(``--run-id``, else a new one) and are printed one per line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_privacy.errors import AuditConfigError


def add_parser(commands: Any) -> None:
    """Add the ``audit`` subcommand to ``commands`` (an ``argparse`` subparsers object)."""
    audit = commands.add_parser(
        "audit",
        help="membership inference (and extraction) against a logged model, logged to MLflow",
        description="Run the 'privacy' MLflow evaluator on a logged model: members are rows it was trained "
        "on, non-members held-out rows (CSV or Parquet, features plus the target column).",
    )
    audit.add_argument("--model-uri", required=True, help="e.g. models:/NAME/1 or runs:/RUN_ID/model")
    audit.add_argument("--members", required=True, type=Path, help="training rows (CSV or Parquet)")
    audit.add_argument("--non-members", required=True, type=Path, help="held-out rows (CSV or Parquet)")
    audit.add_argument("--target", required=True, help="name of the label column")
    audit.add_argument("--delta", type=float, help="δ for the implied ε (default: the training run's)")
    audit.add_argument("--train-run-id", help="the training run: its ε history, audit metrics and canary scores")
    audit.add_argument("--run-id", help="log into this MLflow run (default: a new run)")
    audit.add_argument("--attacks", nargs="+", choices=("loss", "confidence"), help="default: both")
    audit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    audit.add_argument("--extraction-budgets", type=int, nargs="+", help="query budgets to extract with")
    audit.add_argument("--extraction-pool", type=Path, help="the attacker's inputs (features only)")
    audit.set_defaults(run=run)


def _read(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise AuditConfigError(f"{path} does not exist or is not a file; give a CSV or Parquet file.")
    return pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)


def _split(frame: Any, target: str, path: Path) -> tuple[Any, Any]:
    if target not in frame.columns:
        raise AuditConfigError(f"{path} has no column {target!r} (columns: {list(frame.columns)[:10]}...).")
    return frame.drop(columns=[target]).to_numpy(), frame[target].to_numpy()


def run(args: argparse.Namespace) -> str:
    """Evaluate, log, and return the metrics as ``name value`` lines (last line: the run id).

    Raises:
        AuditConfigError: unreadable files, a missing target column, extraction budgets without a
            pool, or a model MLflow cannot load.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    members, non_members = _read(args.members), _read(args.non_members)
    config: dict[str, Any] = {
        "members": _split(members, args.target, args.members),
        "bootstrap": args.bootstrap,
    }
    for key in ("delta", "train_run_id", "attacks", "extraction_budgets"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.extraction_budgets:
        if args.extraction_pool is None:
            raise AuditConfigError("--extraction-budgets needs --extraction-pool (the attacker's own inputs).")
        pool = _read(args.extraction_pool)
        config["extraction_pool"] = pool.drop(columns=[args.target], errors="ignore").to_numpy()
    _split(non_members, args.target, args.non_members)
    try:
        with mlflow.start_run(run_id=args.run_id) as active:
            result = mlflow.models.evaluate(
                args.model_uri,
                non_members,
                targets=args.target,
                model_type="classifier",
                evaluators=["privacy"],
                evaluator_config={"privacy": config},
            )
    except MlflowException as error:
        raise AuditConfigError(f"MLflow could not evaluate {args.model_uri}: {error.message}") from None
    lines = [f"{name} {value:.6g}" for name, value in sorted(result.metrics.items())]
    return "\n".join([*lines, f"run_id {active.info.run_id}"])
