"""The ckks flavor in-process: save/load, log/register with privacy tags, pyfunc and the client."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

import mlflow
from lightning_privacy import he
from lightning_privacy.errors import CompilationError
from lightning_privacy.mlflow_plugins import ContextCache, EncryptedClient, ckks, protocol
from tests.mlflow_plugins.conftest import assert_matches_reference

PRIVACY_TAGS = {
    "privacy.epsilon": "2.97",
    "privacy.delta": "1e-05",
    "privacy.noise_multiplier": "1.1",
    "privacy.max_grad_norm": "1.0",
    "privacy.accountant": "prv",
}


def test_save_load_round_trip_gives_identical_outputs(compiled, digits, tmp_path):
    ckks.save_model(compiled, tmp_path / "model")
    loaded = ckks.load_model(str(tmp_path / "model"))
    x = digits.x_test[:8]
    np.testing.assert_array_equal(loaded.plaintext_forward(x), compiled.plaintext_forward(x))
    keyring = he.Keyring(compiled, "batch")
    batch, context = keyring.encrypt(x), he.PublicContext.from_bytes(keyring.public_context_bytes())
    np.testing.assert_array_equal(
        keyring.decrypt(loaded.evaluate(batch, context)), keyring.decrypt(compiled.evaluate(batch, context))
    )
    mlmodel = yaml.safe_load((tmp_path / "model" / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "lightning_privacy.mlflow_plugins.ckks"
    assert mlmodel["flavors"]["ckks"]["poly_modulus_degree"] == compiled.params.poly_modulus_degree
    assert "lightning-privacy" in (tmp_path / "model" / "requirements.txt").read_text()


def test_save_model_compiles_a_torch_module(digits, reference, tmp_path):
    from torch import nn

    torch_model = nn.Sequential(nn.Linear(64, 4), he.nn.Square(), nn.Linear(4, 10)).eval()
    ckks.save_model(torch_model, tmp_path / "model", calibration_data=digits.x_train)
    loaded = ckks.load_model(str(tmp_path / "model"))
    import torch

    with torch.no_grad():
        expected = torch_model(torch.from_numpy(digits.x_test[:16])).numpy()
    np.testing.assert_allclose(loaded.plaintext_forward(digits.x_test[:16]), expected, atol=1e-4)


def test_save_model_compiles_an_onnx_model(onnx_model, compiled, digits, tmp_path):
    ckks.save_model(onnx_model, tmp_path / "model", calibration_data=digits.x_train)
    loaded = ckks.load_model(str(tmp_path / "model"))
    assert loaded.params == compiled.params
    np.testing.assert_array_equal(loaded.plaintext_forward(digits.x_test), compiled.plaintext_forward(digits.x_test))


def test_compiling_without_calibration_data_is_refused(onnx_model, tmp_path):
    with pytest.raises(CompilationError, match="calibration_data"):
        ckks.save_model(onnx_model, tmp_path / "model")


def test_registered_version_carries_the_privacy_tags_of_the_run(compiled):
    with mlflow.start_run():
        mlflow.set_tags({**PRIVACY_TAGS, "team": "not copied"})
        info = ckks.log_model(compiled, name="model", registered_model_name="digits-ckks")
    version = mlflow.MlflowClient().get_model_version("digits-ckks", info.registered_model_version)
    assert {k: v for k, v in version.tags.items() if k.startswith("privacy.")} == PRIVACY_TAGS
    assert "team" not in version.tags


def test_in_process_client_matches_onnxruntime(compiled, digits, reference):
    with mlflow.start_run():
        info = ckks.log_model(compiled, name="model", registered_model_name="digits-ckks")
    uri = f"models:/digits-ckks/{info.registered_model_version}"
    client = EncryptedClient(uri)
    x = digits.x_test[:64]
    logits = client.predict_logits(pd.DataFrame(x))
    assert_matches_reference(logits, reference(x))
    np.testing.assert_array_equal(client.predict(x[:5]), reference(x[:5]).argmax(1))
    proba = client.predict_proba(x[:5])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)

    # A fresh context cache (as after a restart): the in-process client re-sends its context too.
    client._pyfunc._model_impl.contexts = ContextCache()
    assert_matches_reference(client.predict_logits(x[:3]), reference(x[:3]))

    with pytest.raises(MlflowException) as info_:
        mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(x))
    assert info_.value.get_http_status_code() == 400
    assert info_.value.json_kwargs[protocol.ERROR_CODE_FIELD] == "PLAINTEXT_INPUT"
