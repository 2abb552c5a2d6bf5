"""Private training to encrypted serving, in one run, on scikit-learn's digits.

1. Train an unmodified LightningModule with DP-SGD (the ``DifferentialPrivacy`` callback); ε goes
   to MLflow (``sqlite:///mlflow.db`` in the working directory unless ``MLFLOW_TRACKING_URI`` is set).
2. Export it to ONNX, compile it to CKKS, register it with its ``privacy.*`` tags, alias ``champion``.
3. Serve it with ``mlflow models serve`` (a subprocess on 127.0.0.1, stopped even on error).
4. Send the test split encrypted through ``EncryptedClient``; decrypt on the client.
5. Print ε, δ, plaintext and encrypted accuracy, agreement, latency per sample, bytes per request.

Run::

    python examples/encrypted_serving.py
"""

from __future__ import annotations

import argparse
import os
import time

import mlflow
import numpy as np
import onnxruntime
import pytorch_lightning as pl
import torch
from tqdm import tqdm
from train_dp_digits import DigitsClassifier, digits_splits, train

from lightning_privacy import he
from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ckks

MODEL_NAME = "digits-ckks"
ALIAS = "champion"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0, help="target ε of DP training")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--single-samples", type=int, default=16, help="test samples sent one per request")
    args = parser.parse_args()

    # The served model resolves models:/ URIs through the environment the server inherits.
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    os.environ.setdefault("MLFLOW_REGISTRY_URI", os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(os.environ["MLFLOW_REGISTRY_URI"])
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)

    train_data, test_data = digits_splits()
    x_train = train_data.tensors[0].numpy()
    x_test, y_test = (t.numpy() for t in test_data.tensors)
    # The same plain LightningModule as train_dp_digits.py, with x² (exact under CKKS) for ReLU.
    model = DigitsClassifier(activation=he.nn.Square())
    dp, logger = train(model, train_data, test_data, epsilon=args.epsilon, delta=args.delta, epochs=args.epochs)
    model.eval()
    with torch.no_grad():
        plain_logits = model(torch.from_numpy(x_test)).numpy()

    print("Compiling to CKKS and registering ...")
    proto = he.export(model.net, torch.from_numpy(x_test[:1]))
    compiled = he.compile(proto, x_train)
    with mlflow.start_run(run_id=logger.run_id) as run:  # the DP run: log_model copies its privacy.* tags
        info = ckks.log_model(compiled, name="model", registered_model_name=MODEL_NAME)
    registry = mlflow.MlflowClient()
    registry.set_registered_model_alias(MODEL_NAME, ALIAS, info.registered_model_version)
    tags = registry.get_model_version(MODEL_NAME, info.registered_model_version).tags
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    onnx_logits = session.run(None, {session.get_inputs()[0].name: x_test})[0]

    uri = f"models:/{MODEL_NAME}@{ALIAS}"
    print(f"Serving {uri} (mlflow models serve) ...")
    rows = []
    with ScoringServer(uri, log_path="mlflow-serve.log") as server:
        for layout, samples, chunk in (
            ("batch", len(x_test), len(x_test)),
            ("single", min(args.single_samples, len(x_test)), 1),
        ):
            client = EncryptedClient(uri, url=server.url, layout=layout)
            client.predict_logits(x_test[:1])  # key generation and the one-time context upload
            sent, received, before = client.bytes_sent, client.bytes_received, client.requests_sent
            logits, start = [], time.perf_counter()
            for i in tqdm(range(0, samples, chunk), desc=f"encrypted predict ({layout})", unit="request"):
                logits.append(client.predict_logits(x_test[i : i + chunk]))
            seconds = time.perf_counter() - start
            enc = np.concatenate(logits)
            n_requests = client.requests_sent - before
            rows.append({
                "layout": layout,
                "samples": samples,
                "plain_acc": (plain_logits[:samples].argmax(1) == y_test[:samples]).mean(),
                "enc_acc": (enc.argmax(1) == y_test[:samples]).mean(),
                "agreement": (enc.argmax(1) == plain_logits[:samples].argmax(1)).mean(),
                "max_err": np.abs(enc - onnx_logits[:samples]).max(),
                "ms_per_sample": 1e3 * seconds / samples,
                "bytes_per_request": (client.bytes_sent - sent + client.bytes_received - received) / n_requests,
                "first_request_bytes": sent,
            })  # fmt: skip

    print(f"\nMLflow run {run.info.run_id}; {MODEL_NAME} v{info.registered_model_version} tags:")
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(tags.items()) if k.startswith("privacy.")))
    eps, delta = float(tags["privacy.epsilon"]), float(tags["privacy.delta"])
    header = (
        f"{'layout':<7} {'epsilon':>7} {'delta':>7} {'samples':>7} {'plain acc':>9} {'enc acc':>8} "
        f"{'agree':>7} {'max|err|':>9} {'ms/sample':>10} {'KB/request':>11} {'KB 1st request':>14}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['layout']:<7} {eps:>7.3f} {delta:>7.0e} {r['samples']:>7d} {r['plain_acc']:>9.4f} "
            f"{r['enc_acc']:>8.4f} {r['agreement']:>7.2%} {r['max_err']:>9.1e} {r['ms_per_sample']:>10.2f} "
            f"{r['bytes_per_request'] / 1024:>11.1f} {r['first_request_bytes'] / 1024:>14.1f}"
        )
    print(
        "KB/request: request + response body, ciphertexts in base64. The public context is sent once per\n"
        "key, in the first request (KB 1st request: one sample plus the context); max|err|: vs onnxruntime."
    )
    print(f"Server log (request lines and status codes, no bodies): {os.path.abspath('mlflow-serve.log')}")


if __name__ == "__main__":
    main()
