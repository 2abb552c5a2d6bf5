"""The served model's evaluation pool: a request that arrives while another is evaluated in the
serving process goes to a pool process, which uses the contexts the server received and raises
the server's errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from lightning_privacy import he
from lightning_privacy.mlflow_plugins import ckks, protocol
from lightning_privacy.mlflow_plugins.context_spill import SPILL_DIR_ENV
from lightning_privacy.mlflow_plugins.evaluation_pool import PROCESSES_ENV
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest
from tests.mlflow_plugins.conftest import assert_matches_reference


def _frame(row: EncryptedRequest) -> pd.DataFrame:
    split = protocol.encode_request([row])["dataframe_split"]
    return pd.DataFrame(split["data"], columns=split["columns"])


def test_busy_server_hands_requests_to_a_pool_process_that_shares_its_contexts(
    compiled, digits, reference, monkeypatch, tmp_path
):
    monkeypatch.setenv(PROCESSES_ENV, "2")
    monkeypatch.setenv(SPILL_DIR_ENV, str(tmp_path / "spill"))
    compiled.save(tmp_path / "model")
    wrapper = ckks._load_pyfunc(str(tmp_path / "model"))  # what mlflow.pyfunc.load_model calls
    pool = wrapper.pool
    try:
        keyring = he.Keyring(compiled, "single")
        context, x = keyring.public_context_bytes(), digits.x_test[:2]
        key_id = protocol.key_id_of(context)

        def logits(frame: pd.DataFrame) -> np.ndarray:
            (result,) = protocol.decode_response(wrapper.predict(frame))
            return keyring.decrypt(he.EncryptedBatch.from_bytes(result, keyring.public_context))

        ciphertext = keyring.encrypt(x).to_bytes()
        assert_matches_reference(logits(_frame(EncryptedRequest(key_id, "single", context, ciphertext))), reference(x))
        assert pool._executor is None  # one request at a time: evaluated here, no process started
        with pool._here:  # as while another request is evaluated here
            # No context: the pool process finds the one this process received in the spill tier.
            assert_matches_reference(logits(_frame(EncryptedRequest(key_id, "single", None, ciphertext))), reference(x))
            assert pool._executor is not None and pool._answered
            stranger = he.Keyring(compiled, "single").public_context_bytes()
            with pytest.raises(MlflowException) as info:
                wrapper.predict(_frame(EncryptedRequest(protocol.key_id_of(stranger), "single", None, ciphertext)))
        assert info.value.json_kwargs[protocol.ERROR_CODE_FIELD] == "UNKNOWN_KEY_ID"  # the pool's error, as ours
    finally:
        pool.close()


def test_one_process_means_no_pool(compiled, monkeypatch, tmp_path):
    monkeypatch.setenv(PROCESSES_ENV, "1")
    monkeypatch.delenv(SPILL_DIR_ENV, raising=False)
    compiled.save(tmp_path / "model")
    wrapper = ckks._load_pyfunc(str(tmp_path / "model"))
    assert wrapper.pool is None and wrapper.contexts.spill is None
