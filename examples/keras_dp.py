"""The textbook Keras DP-SGD example, on Keras 3 with the torch backend, end to end.

The classic TensorFlow Privacy tutorial model (Dense 16 relu -> Flatten -> Dense 10) trained with
``lightning_privacy.keras.make_private`` at max_grad_norm=1.0, noise_multiplier=1.1, SGD lr 0.15,
Poisson batches of expected size 250, 5 epochs, on scikit-learn's digits (8x8 images, no download):

1. ``model.fit`` with DP-SGD; ε per epoch in the progress bar and ``history.history["epsilon"]``;
   the run in MLflow (``sqlite:///mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set): the metric
   ``epsilon``, ``privacy.*`` params and tags.
2. ε of the same run by two accountants, PRV (the one training used) and RDP, side by side.
3. Keras -> ONNX (Keras' own ``model.export``) -> CKKS; registered as ``keras-digits-ckks`` with the
   run's ``privacy.*`` tags; the test split evaluated encrypted in-process against ``model.predict``.
4. One table at the end, with the same model trained without DP for reference.

Run::

    python examples/keras_dp.py            # relu (the tutorial's) and x² (exact under CKKS) side by side
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras reads it once, at its first import

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from lightning_privacy import he  # noqa: E402
from lightning_privacy.keras import make_private  # noqa: E402
from lightning_privacy.mlflow_plugins import ckks  # noqa: E402

MODEL_NAME = "keras-digits-ckks"


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (n, 8, 8) float32 in [0, 1]; 80/20 split, stratified, seed 0."""
    data = load_digits()
    x = (data.images / 16.0).astype("float32")
    return train_test_split(x, data.target.astype("int64"), test_size=0.2, random_state=0, stratify=data.target)


def build(activation: str) -> keras.Model:
    """The tutorial's model: Dense 16 (on each image row) -> Flatten -> Dense 10 logits; ``square``
    replaces relu by x², which CKKS evaluates exactly (relu is approximated by a polynomial)."""
    act = keras.ops.square if activation == "square" else "relu"
    return keras.Sequential(
        [keras.Input((8, 8)), keras.layers.Dense(16, activation=act), keras.layers.Flatten(), keras.layers.Dense(10)]
    )


def run(activation: str, args: argparse.Namespace, data: tuple[np.ndarray, ...]) -> dict:
    """Train one model privately (and the same one without DP, for reference), compile and register it."""
    x_train, x_test, y_train, y_test = data
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras.utils.set_random_seed(0)
    baseline = build(activation)
    baseline.compile(optimizer=keras.optimizers.SGD(0.15), loss=loss, metrics=["accuracy"])
    baseline.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, verbose=0)
    plain_accuracy = baseline.evaluate(x_test, y_test, verbose=0)[1]

    keras.utils.set_random_seed(0)
    model = make_private(build(activation), noise_multiplier=1.1, max_grad_norm=1.0, delta=args.delta)
    model.compile(optimizer=keras.optimizers.SGD(0.15), loss=loss, metrics=["accuracy"])
    with mlflow.start_run(run_name=f"keras-dp-digits-{activation}") as mlflow_run:
        history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, verbose=2)
        accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
        eps_rdp = model.privacy_engine.ledger.epsilon(args.delta, "rdp")
        mlflow.log_metrics({"test_accuracy": accuracy, "epsilon_rdp": eps_rdp})

        print("Compiling to CKKS and registering ...")
        proto = he.export(model, torch.as_tensor(x_test[:1]))  # Keras' own model.export(format="onnx")
        compiled = he.compile(proto, x_train)
        info = ckks.log_model(compiled, name="model", registered_model_name=MODEL_NAME)

    keys = he.Keyring(compiled, layout=compiled.choose_layout(len(x_test)))
    context = he.PublicContext.from_bytes(keys.public_context_bytes())  # what a server holds
    encrypted = keys.decrypt(compiled.evaluate(keys.encrypt(x_test), context))
    plain = model.predict(x_test, verbose=0)
    tags = mlflow.MlflowClient().get_model_version(MODEL_NAME, info.registered_model_version).tags
    print(f"MLflow run {mlflow_run.info.run_id}; {MODEL_NAME} v{info.registered_model_version}: "
          + ", ".join(f"{k}={v}" for k, v in sorted(tags.items()) if k.startswith("privacy.")))  # fmt: skip
    print("epsilon per epoch (PRV):", ", ".join(f"{e:.3f}" for e in history.history["epsilon"]))
    return {
        "activation": activation,
        "steps": model.privacy_engine.steps,
        "eps_prv": model.epsilon,
        "eps_rdp": eps_rdp,
        "plain_acc": plain_accuracy,
        "dp_acc": accuracy,
        "enc_acc": (encrypted.argmax(1) == y_test).mean(),
        "agree": (encrypted.argmax(1) == plain.argmax(1)).mean(),
        "max_err": np.abs(encrypted - plain).max(),
        "version": info.registered_model_version,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--activations", nargs="+", choices=("relu", "square"), default=["relu", "square"])
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    torch.set_num_threads(1)
    data = digits()
    rows = [run(activation, args, data) for activation in args.activations]

    header = (
        f"{'activation':<10} {'steps':>5} {'eps PRV':>8} {'eps RDP':>8} {'delta':>7} {'acc no DP':>9} "
        f"{'acc DP':>7} {'enc acc':>8} {'agree':>7} {'max|err|':>9} {'version':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['activation']:<10} {r['steps']:>5} {r['eps_prv']:>8.3f} {r['eps_rdp']:>8.3f} {args.delta:>7.0e} "
            f"{r['plain_acc']:>9.4f} {r['dp_acc']:>7.4f} {r['enc_acc']:>8.4f} {100 * r['agree']:>6.2f}% "
            f"{r['max_err']:>9.1e} {r['version']:>7}"
        )


if __name__ == "__main__":
    main()
