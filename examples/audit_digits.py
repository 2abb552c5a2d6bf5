"""What DP buys against two attacks, measured on scikit-learn's digits.

The same plain LightningModule (MLP 64-32-10 with x², so it also runs under CKKS) is trained without
DP and with DP-SGD at ε ≈ 8, 3 and 1 (δ = 1e-5), each run audited from the inside with 1000
gradient canaries (``PrivacyAudit``: the one-run ε lower bound of Steinke et al.). Then:

1. membership inference (loss attack) of the training split against the held-out split;
2. model extraction: a client that decrypts full logits distils an MLP from 100 / 1,000 / 10,000
   queries; fidelity is argmax agreement with the model on the held-out split. Without defence,
   with output perturbation calibrated to flip at most 1 % of the defender's own predictions, and
   with a query budget of 1,000 per client;
3. (``--serve``) the ε ≈ 3 model compiled to CKKS, logged, served with ``mlflow models serve`` and
   extracted through ``EncryptedClient`` (batch layout, 1000 encrypted queries per request):
   without defence, with the ckks flavor's output noise (the server adds Gaussian noise of the
   calibrated s.d., and twice that, to the encrypted logits) and with its query budget of 1,000
   per client key; then ``mlflow.models.evaluate(..., evaluators=["privacy"])`` logs the MIA
   metrics and PNGs of the training run to MLflow.

Both tables give distillation / equation solving: fidelity (argmax agreement with the model on the
held-out split) and the surrogate's accuracy on it.

Run::

    python examples/audit_digits.py            # ~3 min on a 2-core machine; --serve adds ~10 min (4 servers)

MLflow: MLFLOW_TRACKING_URI if set, else ``sqlite:///mlflow.db`` in the working directory.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import mlflow
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy import audit, he
from lightning_privacy.callbacks import DifferentialPrivacy
from lightning_privacy.callbacks.privacy_audit import PrivacyAudit

EXPERIMENT = "lightning-privacy-audit"
BUDGETS = (100, 1000, 10000)
DELTA = 1e-5


class Digits(pl.LightningModule):
    """A plain LightningModule; nothing in it knows about privacy or canaries."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), he.nn.Square(), nn.Linear(32, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Members (50 %: the training set), non-members (25 %) and the attacker's own inputs (25 %)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y)
    x_out, x_pool, y_out, y_pool = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    return {"members": (x_tr, y_tr), "non_members": (x_out, y_out), "pool": (x_pool, y_pool)}


def train(epsilon: float | None, data, epochs: int, seed: int = 0) -> tuple[Digits, dict[str, float], str]:
    """One audited run; returns the model, its privacy figures and the MLflow run id."""
    pl.seed_everything(seed, verbose=False)
    model = Digits()
    dp = DifferentialPrivacy(target_epsilon=epsilon, delta=DELTA, max_grad_norm=1.0) if epsilon else None
    canaries = PrivacyAudit(canaries=1000, kind="gradient", delta=DELTA if dp is None else None, seed=seed)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[c for c in (dp, canaries) if c],
    )  # fmt: skip
    x, y = (torch.from_numpy(a) for a in data["members"])
    with mlflow.start_run(run_name=f"epsilon={epsilon or 'inf'}") as run:
        trainer.fit(model, DataLoader(TensorDataset(x, y.long()), batch_size=64, shuffle=True))
    model.eval()
    return (
        model,
        {"epsilon": dp.epsilon if dp else math.inf, "bound": canaries.result.epsilon_lower_bound},
        run.info.run_id,
    )


def logits_of(model: nn.Module):
    def logits(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(x), dtype=torch.float32)).double().numpy()

    return logits


def extraction_rows(name: str, target, data, defender_inputs: np.ndarray) -> list[list]:
    x_out, y_out = data["non_members"]
    kwargs = dict(pool=data["pool"][0], holdout=x_out, holdout_labels=y_out, reference=target)
    scale = audit.OutputPerturbation.calibrate(target(defender_inputs), max_flips=0.01)
    rows = []
    for defence, make_api in (
        ("none", lambda: target),
        (f"output noise s.d. {scale:.2f}", lambda: audit.OutputPerturbation(target, scale)),
        ("query budget 1000", lambda: audit.QueryBudget(target, 1000)),
    ):
        # Distillation, and equation solving: a CKKS model is a polynomial of its inputs (here of degree 2).
        reports = [audit.extraction(make_api(), BUDGETS, surrogate=s, **kwargs) for s in ("mlp", "quadratic")]
        rows.append([name, defence, *[[p.fidelity for p in r.points] for r in reports],
                     *[[p.accuracy for p in r.points] for r in reports]])  # fmt: skip
    return rows


class AnswerMemo:
    """The attacker's record of answers: a query asked before is not asked again."""

    def __init__(self, api) -> None:
        self.api, self.answers = api, {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        keys = [row.tobytes() for row in np.asarray(x, dtype=np.float64)]
        new = [i for i, k in enumerate(keys) if k not in self.answers]
        if new:
            for i, answer in zip(new, self.api(np.asarray(x)[new]), strict=True):
                self.answers[keys[i]] = answer
        return np.stack([self.answers[k] for k in keys])


def serve_and_extract(model: Digits, run_id: str, data, noise: float) -> tuple[list, dict[str, float]]:
    """The ε ≈ 3 model under CKKS behind `mlflow models serve`, extracted through EncryptedClient
    without defence and with each defence of the ckks flavor (output noise of s.d. ``noise`` and
    twice that, added by the server to the encrypted logits; a query budget of 1000 per client
    key); then the `privacy` evaluator on the undefended logged model."""
    from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ServingDefences, ckks
    from lightning_privacy.mlflow_plugins.defences import budgeted

    x_tr, y_tr = data["members"]
    x_out, y_out = data["non_members"]
    compiled = he.compile(he.export(model.net, torch.from_numpy(x_tr[:1])), x_tr)
    served = [
        ("none", None),
        (f"output noise s.d. {noise:.2f}", ServingDefences(output_noise_std=noise)),
        (f"output noise s.d. {2 * noise:.2f}", ServingDefences(output_noise_std=2 * noise)),
        ("query budget 1000", ServingDefences(query_budget=1000)),
    ]
    rows, infos = [], []
    with mlflow.start_run(run_id=run_id):
        for i, (_, defences) in enumerate(served):
            infos.append(ckks.log_model(compiled, name=f"model-{i}", defences=defences))
    for (defence, _), info in zip(served, infos, strict=True):
        with ScoringServer(info.model_uri, log_path="mlflow-serve-audit.log") as server:
            with EncryptedClient(info.model_uri, url=server.url, layout="batch") as client:
                start = time.perf_counter()
                # The attacker asks once (1000 inputs per encrypted request) and fits both surrogates
                # on the same answers; a refused request (query budget) ends its queries.
                api = AnswerMemo(budgeted(client.predict_logits))
                kwargs = dict(pool=data["pool"][0], holdout=x_out, holdout_labels=y_out, reference=logits_of(model))
                reports = [
                    audit.extraction(api, BUDGETS, surrogate=s, chunk=1000, **kwargs) for s in ("mlp", "quadratic")
                ]
                seconds, requests = time.perf_counter() - start, client.requests_sent
        answered = reports[0].points[-1].answered
        cost = f"{answered:,} encrypted queries, {requests} requests, {seconds:.0f} s with both fits"
        rows.append(["DP ε≈3, served (CKKS)", f"{defence} ({cost})", *[[p.fidelity for p in r.points] for r in reports],
                     *[[p.accuracy for p in r.points] for r in reports]])  # fmt: skip
    evaluation = pd.DataFrame(x_out).assign(label=y_out)
    with mlflow.start_run(run_id=run_id):
        result = mlflow.models.evaluate(
            infos[0].model_uri, evaluation, targets="label", model_type="classifier", evaluators=["privacy"],
            evaluator_config={"privacy": {"members": (x_tr, y_tr), "train_run_id": run_id, "bootstrap": 100}},
        )  # fmt: skip
    return rows, result.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 3.0, 1.0])
    parser.add_argument("--serve", action="store_true", help="also extract the ε≈3 model through mlflow models serve")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    os.environ.setdefault("MLFLOW_REGISTRY_URI", os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(EXPERIMENT)
    torch.set_num_threads(1)
    data = splits()
    (x_in, y_in), (x_out, y_out) = data["members"], data["non_members"]

    privacy_rows, extraction_table, served = [], [], None
    for epsilon in [None, *args.epsilons]:
        name = "non-private" if epsilon is None else f"DP ε≈{epsilon:g}"
        print(f"Training {name} ...", flush=True)
        model, figures, run_id = train(epsilon, data, args.epochs)
        accuracy = float((logits_of(model)(x_out).argmax(1) == y_out).mean())
        mia = audit.membership_inference(model, (x_in, y_in), (x_out, y_out), attacks=["loss"], delta=DELTA)["loss"]
        privacy_rows.append([name, accuracy, figures["epsilon"], figures["bound"], mia.auc, mia.tpr_at_fpr[0.001][0]])
        extraction_table += extraction_rows(name, logits_of(model), data, x_in)
        if args.serve and epsilon == 3.0:
            # the in-process rows' calibration: at most 1 % of the defender's own predictions flip
            served = (model, run_id, data, audit.OutputPerturbation.calibrate(logits_of(model)(x_in), max_flips=0.01))
    evaluator_metrics = None
    if served is not None:
        print("Serving the ε≈3 model with mlflow models serve, without and with each defence ...", flush=True)
        rows, evaluator_metrics = serve_and_extract(*served)
        extraction_table += rows

    columns = ["model", "test accuracy", "accountant ε (δ = 1e-5)", "one-run ε lower bound (95 %)", "MIA AUC (loss)"]
    print("\n| " + " | ".join([*columns, "TPR @ 0.1 % FPR"]) + " |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, acc, eps, bound, auc, tpr in privacy_rows:
        eps_text = "∞" if math.isinf(eps) else f"{eps:.2f}"
        print(f"| {name} | {acc:.3f} | {eps_text} | {bound:.2f} | {auc:.3f} | {tpr:.3f} |")
    header = " | ".join(f"@ {b:,}" for b in BUDGETS)
    for title, first in (("Extraction fidelity (argmax agreement with the model)", 2), ("Surrogate test accuracy", 4)):
        print(f"\n{title}, distillation / equation solving, at each query budget")
        print(f"\n| model | defence | {header} |")
        print("| --- | --- | " + " | ".join("---" for _ in BUDGETS) + " |")
        for name, defence, *columns in extraction_table:
            distil, solve = columns[first - 2], columns[first - 1]
            cells = [f"{a:.3f} / {b:.3f}" for a, b in zip(distil, solve, strict=True)]
            print(f"| {name} | {defence} | " + " | ".join(cells) + " |")
    if evaluator_metrics is not None:
        shown = {k: round(v, 4) for k, v in sorted(evaluator_metrics.items()) if k.startswith(("mia.loss.", "audit."))}
        print(f"\nprivacy evaluator on the served model's MLflow run: {shown}")
    print(f"\nMLflow store: {mlflow.get_tracking_uri()} (experiment {EXPERIMENT})")


if __name__ == "__main__":
    main()
