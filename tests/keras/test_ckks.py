"""Keras -> ONNX (Keras' own ``model.export``) -> CKKS: encrypted logits against ``model.predict``."""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_privacy import he  # noqa: E402
from lightning_privacy.mlflow_plugins import ckks  # noqa: E402


def test_keras_conv_pool_dense_model_runs_encrypted_as_predict():
    keras.utils.set_random_seed(0)
    square = keras.ops.square  # a polynomial activation: CKKS evaluates it exactly
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3, activation=square),
            keras.layers.AveragePooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation=square),
            keras.layers.Dense(4),
        ]
    )
    x = np.random.default_rng(0).normal(size=(32, 6, 6, 1)).astype("float32")
    proto = he.export(model, torch.as_tensor(x[:1]))
    ops = {n.op_type for n in proto.graph.node}
    assert {"Cast", "Conv", "MatMul", "AveragePool"} <= ops  # what Keras' exporter writes
    compiled = he.compile(proto, x)
    keys = he.Keyring(compiled, layout=compiled.choose_layout(len(x)))
    context = he.PublicContext.from_bytes(keys.public_context_bytes())
    logits = keys.decrypt(compiled.evaluate(keys.encrypt(x), context))
    expected = model.predict(x, verbose=0)
    assert np.abs(logits - expected).max() < 1e-3
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_ckks_flavor_saves_a_keras_model(tmp_path):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation=keras.ops.square), keras.layers.Dense(3)]
    )
    x = np.random.default_rng(1).normal(size=(16, 5)).astype("float32")
    ckks.save_model(model, tmp_path / "model", calibration_data=x)
    compiled = ckks.load_model(str(tmp_path / "model"))
    keys = he.Keyring(compiled, layout=compiled.choose_layout(len(x)))
    context = he.PublicContext.from_bytes(keys.public_context_bytes())
    logits = keys.decrypt(compiled.evaluate(keys.encrypt(x), context))
    assert np.abs(logits - model.predict(x, verbose=0)).max() < 1e-3
