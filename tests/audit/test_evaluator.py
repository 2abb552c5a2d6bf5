"""The ``privacy`` evaluator through MLflow's own entry point: metrics and PNG artifacts in a
temporary store, after a DP training run audited with gradient canaries."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

from lightning_privacy.audit import attack_metrics
from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.callbacks.privacy_audit import PrivacyAudit
from lightning_privacy.mlflow_plugins.evaluator import PrivacyEvaluator
from tests.audit.dpsgd import digits
from tests.audit.test_privacy_audit_callback import DigitsMLP


class TorchLogits(mlflow.pyfunc.PythonModel):
    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def predict(self, context, model_input, params=None):
        with torch.no_grad():
            return self.net(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    x, y = digits()
    idx = np.random.default_rng(0).permutation(len(x))
    train, test = idx[:1200], idx[1200:]
    pl.seed_everything(0, verbose=False)
    module = DigitsMLP(TensorDataset(x[train], y[train]), batch_size=120)
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0, log_every_n_steps=10)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[dp, PrivacyAudit(canaries=500, kind="gradient")],
    )  # fmt: skip
    with mlflow.start_run() as run:
        trainer.fit(module)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=TorchLogits(module.net.eval()), pip_requirements=["torch"]
        )
    data = pd.DataFrame(x[test].numpy(), columns=[f"p{i}" for i in range(64)]).assign(label=y[test].numpy())
    with mlflow.start_run() as eval_run:
        result = mlflow.models.evaluate(
            info.model_uri,
            data,
            targets="label",
            model_type="classifier",
            evaluators=["privacy"],
            evaluator_config={
                "privacy": {
                    "members": (x[train].numpy(), y[train].numpy()),
                    "train_run_id": run.info.run_id,
                    "bootstrap": 20,
                    "extraction_budgets": [100, 400],
                    "extraction_pool": x[train[:400]].numpy(),
                }
            },
        )
    yield result, eval_run.info.run_id, run.info.run_id, module, (x, y, train, test), mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def test_discovered_through_the_entry_point_and_opt_in():
    assert "privacy" in mlflow.models.list_evaluators()
    assert not PrivacyEvaluator.can_evaluate(model_type="classifier", evaluator_config={})
    assert PrivacyEvaluator.can_evaluate(model_type=None, evaluator_config={"members": ([], [])})


def test_metrics_reach_the_run(evaluated):
    result, eval_id, train_id, module, (x, y, train, test), client = evaluated
    logged = client.get_run(eval_id).data.metrics
    for key in ("mia.loss.auc", "mia.confidence.tpr_at_0.1pct_fpr", "mia.loss.epsilon_lower_bound",
                "audit.epsilon_lower_bound", "audit.canaries", "epsilon", "extraction.fidelity_at_400"):  # fmt: skip
        assert key in logged and key in result.metrics, key

    # The AUC recomputed from the model's losses outside MLflow.
    @torch.no_grad()
    def loss(i):
        return -torch.nn.functional.cross_entropy(module.net(x[i]), y[i], reduction="none").numpy()

    assert logged["mia.loss.auc"] == pytest.approx(attack_metrics(loss(train), loss(test), bootstrap=0).auc)
    train_metrics = client.get_run(train_id).data.metrics
    assert logged["audit.epsilon_lower_bound"] == train_metrics["audit.epsilon_lower_bound"] <= logged["epsilon"]
    print({k: round(v, 4) for k, v in sorted(logged.items()) if not k.endswith(("ci_low", "ci_high"))})


def test_png_artifacts(evaluated, tmp_path):
    result, eval_id, *_, client = evaluated
    names = sorted(a.path for a in client.list_artifacts(eval_id, "privacy"))
    assert names == ["privacy/canary_scores.png", "privacy/epsilon_vs_step.png", "privacy/roc_curve.png"]
    for name in names:
        with open(client.download_artifacts(eval_id, name, str(tmp_path)), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(result.artifacts) == {"roc_curve", "epsilon_vs_step", "canary_scores"}
