"""Sealed serving on scikit-learn's digits: the host computes ``y = f(Enc(θ), x)`` and never holds θ.

1. Train the digits MLP with DP-SGD (as ``encrypted_serving.py``), export it, compile it to CKKS.
2. The owner makes an ``OwnerKeyring``, seals the compiled model (weights, biases and polynomial
   coefficients become ciphertexts under the owner's key) and registers it with
   ``ckks.log_model``: the registered artifact holds no plaintext weight.
3. Serve it with ``mlflow models serve``; the owner's ``EncryptedClient`` (with the keyring) sends
   the test split in plaintext (from its own front end) and encrypted, and decrypts the answers.
4. The same model in the request-encrypted mode (weights in the clear on the host, inputs
   encrypted by any client), served beside it, for comparison.
5. Print one table: accuracy, agreement and max error vs onnxruntime, latency per sample end to
   end, artifact and key sizes.

Run::

    python examples/sealed_serving.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pytorch_lightning as pl
import torch
from train_dp_digits import DigitsClassifier, digits_splits, train

from lightning_privacy import he
from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ckks

SEALED_NAME, REQUEST_NAME = "digits-sealed", "digits-ckks"


def _megabytes(directory: str, subdirectory: str = "") -> float:
    root = Path(directory, subdirectory)
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=3.0, help="target ε of DP training")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--samples", type=int, default=60, help="test samples sent one per request in each mode")
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    os.environ.setdefault("MLFLOW_REGISTRY_URI", os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(os.environ["MLFLOW_REGISTRY_URI"])
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)

    train_data, test_data = digits_splits()
    x_train = train_data.tensors[0].numpy()
    x_test, y_test = (t.numpy() for t in test_data.tensors)
    x_test, y_test = x_test[: args.samples], y_test[: args.samples]
    model = DigitsClassifier(activation=he.nn.Square())
    _, logger = train(model, train_data, test_data, epsilon=args.epsilon, delta=args.delta, epochs=args.epochs)
    model.eval()
    proto = he.export(model.net, torch.from_numpy(x_test[:1]))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: x_test})[0]

    print("Compiling, sealing and registering ...")
    compiled = he.compile(proto, x_train)
    owner = he.OwnerKeyring(compiled)  # stays with the owner: the secret key never leaves this process
    sealed = compiled.seal(owner)
    with mlflow.start_run(run_id=logger.run_id):
        sealed_info = ckks.log_model(sealed, name="sealed", registered_model_name=SEALED_NAME)
        request_info = ckks.log_model(compiled, name="model", registered_model_name=REQUEST_NAME)
    sizes = {
        "sealed": _megabytes(mlflow.artifacts.download_artifacts(sealed_info.model_uri)),
        "request": _megabytes(mlflow.artifacts.download_artifacts(request_info.model_uri)),
    }

    rows = []
    for uri, modes in (
        (f"models:/{REQUEST_NAME}/{request_info.registered_model_version}", ["request-encrypted"]),
        (f"models:/{SEALED_NAME}/{sealed_info.registered_model_version}", ["sealed, plain x", "sealed, encrypted x"]),
    ):
        print(f"Serving {uri} (mlflow models serve) ...")
        with ScoringServer(uri, log_path="mlflow-serve.log") as server:
            for mode in modes:
                if mode.startswith("sealed"):
                    client = EncryptedClient(
                        uri, url=server.url, keyring=owner, mode="plain" if "plain" in mode else "encrypted"
                    )
                    keys = len(owner.public_context_bytes())
                else:
                    client = EncryptedClient(uri, url=server.url, layout="single")
                    keys = len(he.Keyring(compiled, "single").public_context_bytes())
                client.predict_logits(x_test[:1])  # warm-up (and the request mode's one-time context upload)
                start = time.perf_counter()
                logits = np.concatenate([client.predict_logits(x_test[i : i + 1]) for i in range(len(x_test))])
                seconds = time.perf_counter() - start
                client.close()
                rows.append({
                    "mode": mode,
                    "acc": (logits.argmax(1) == y_test).mean(),
                    "agree": (logits.argmax(1) == reference.argmax(1)).mean(),
                    "max_err": np.abs(logits - reference).max(),
                    "ms": 1e3 * seconds / len(x_test),
                    "artifact": sizes["sealed" if mode.startswith("sealed") else "request"],
                    "keys": keys / 1e6,
                    "weights": "no" if mode.startswith("sealed") else "yes",
                })  # fmt: skip

    header = (
        f"{'mode':<20} {'samples':>7} {'enc acc':>8} {'agree':>7} {'max|err|':>9} {'ms/sample':>10} "
        f"{'artifact MB':>11} {'keys MB':>8} {'plain θ on host':>15}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['mode']:<20} {len(x_test):>7d} {r['acc']:>8.4f} {r['agree']:>7.2%} {r['max_err']:>9.1e} "
            f"{r['ms']:>10.1f} {r['artifact']:>11.1f} {r['keys']:>8.1f} {r['weights']:>15}"
        )
    print(
        "ms/sample: one sample per request through mlflow models serve on 127.0.0.1 (encrypt, HTTP, evaluate,\n"
        "decrypt). agree and max|err|: vs onnxruntime on the same ONNX. artifact MB: the registered model\n"
        "directory (with the bundled wheel). keys MB: the public context the host holds (sealed: in the\n"
        "artifact; request mode: uploaded by each client)."
    )


if __name__ == "__main__":
    main()
