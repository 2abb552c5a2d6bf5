"""The ``output_noise_std`` defence of the ckks flavor: a client of the served model decrypts
logits that carry fresh Gaussian noise of the configured s.d., argmax still mostly agrees at small
noise, the registered version records the setting, and bad settings are refused.

References: onnxruntime logits of the ONNX the model was compiled from (``reference``), and the
normal law (mean, s.d. with tolerances of 4-5 standard errors)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from lightning_privacy import he
from lightning_privacy.errors import ServingConfigError
from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ckks
from lightning_privacy.mlflow_plugins.defences import CONFIG_KEY, ServingDefences

STD = 0.1


def _assert_noise(noisy: np.ndarray, exact: np.ndarray, std: float) -> None:
    noise = (noisy - exact).ravel()
    n = len(noise)
    assert abs(noise.mean()) < 4 * std / np.sqrt(n)
    assert abs(noise.std() / std - 1) < 5 / np.sqrt(2 * n)


@pytest.fixture(scope="module")
def noisy_model(compiled, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "noisy"
    ckks.save_model(compiled, path, defences=ServingDefences(output_noise_std=STD))
    return str(path)


def test_settings_round_trip_and_tags():
    defences = ServingDefences(query_budget=1000, output_noise_std=0.25)
    assert ServingDefences.from_model_config(defences.model_config()) == defences
    assert defences.tags() == {"privacy.defence.query_budget": "1000", "privacy.defence.output_noise_std": "0.25"}
    assert ServingDefences(output_noise_std=1).active and ServingDefences(output_noise_std=1).output_noise_std == 1.0


@pytest.mark.parametrize("std", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_noise_settings_are_refused(std):
    with pytest.raises(ServingConfigError, match="output_noise_std"):
        ServingDefences(output_noise_std=std)


def test_a_model_config_with_unknown_or_bad_settings_is_refused():
    with pytest.raises(ServingConfigError, match="output_noise"):
        ServingDefences.from_model_config({CONFIG_KEY: {"output_noise": 0.1}})  # misspelt: never dropped silently
    with pytest.raises(ServingConfigError, match="output_noise_std"):
        ServingDefences.from_model_config({CONFIG_KEY: {"output_noise_std": -1.0}})


def test_sealed_models_refuse_defences(compiled, tmp_path):
    sealed = compiled.seal(he.OwnerKeyring(compiled))
    with pytest.raises(ServingConfigError, match="sealed"):
        ckks.save_model(sealed, tmp_path / "sealed", defences=ServingDefences(output_noise_std=STD))


def test_the_registered_version_records_the_noise(compiled):
    with mlflow.start_run():
        info = ckks.log_model(compiled, name="model", registered_model_name="noisy",
                              defences=ServingDefences(output_noise_std=STD))  # fmt: skip
    version = mlflow.MlflowClient().get_model_version("noisy", info.registered_model_version)
    assert version.tags["privacy.defence.output_noise_std"] == str(STD)
    assert "privacy.defence.query_budget" not in version.tags
    assert ServingDefences.from_model_config(info.flavors["python_function"].get("config")).output_noise_std == STD


@pytest.mark.parametrize("layout", ["batch", "single"])
def test_in_process_client_gets_noisy_logits(noisy_model, digits, reference, layout):
    x = digits.x_test if layout == "batch" else digits.x_test[:24]
    client = EncryptedClient(noisy_model, url=None, layout=layout)
    exact = reference(x)
    first, second = client.predict_logits(x), client.predict_logits(x)
    draws = np.concatenate([first, second])
    if layout == "batch":  # 720 x 10 draws; the single layout's 480 are too few for the s.d. bound
        _assert_noise(draws, np.concatenate([exact, exact]), STD)
    else:
        assert 0.7 * STD < (draws - np.concatenate([exact, exact])).std() < 1.3 * STD
    assert np.abs(first - second).min() > 0  # fresh noise on every request
    assert (first.argmax(1) == exact.argmax(1)).mean() >= 0.9


@pytest.mark.slow
def test_served_model_answers_with_noise(noisy_model, digits, reference):
    x = digits.x_test
    with ScoringServer(noisy_model) as server:
        with EncryptedClient(noisy_model, url=server.url, layout="batch") as client:
            first, second = client.predict_logits(x), client.predict_logits(x)
        with EncryptedClient(noisy_model, url=server.url, layout="single") as client:
            single = client.predict_logits(x[:16])
    exact = reference(x)
    _assert_noise(np.concatenate([first, second]), np.concatenate([exact, exact]), STD)
    assert 0.6 * STD < (single - exact[:16]).std() < 1.4 * STD  # 160 draws: s.e. 6 %
    assert np.abs(first - second).min() > 0
    assert (first.argmax(1) == exact.argmax(1)).mean() >= 0.9
