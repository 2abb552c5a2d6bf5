"""The pyfunc wrapper in-process: forged contexts are MODEL_MISMATCH, any other failure is a
generic INTERNAL_ERROR whose stack trace goes to the server log only."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import infer_and_parse_data

import lightning_privacy
from lightning_privacy import he
from lightning_privacy.mlflow_plugins import ckks, protocol
from tests.mlflow_plugins import forgeries

SERVER_PATH = str(Path(lightning_privacy.__file__).resolve().parent.parent)


def _predict(wrapper: ckks._CKKSModelWrapper, row) -> MlflowException:
    with pytest.raises(MlflowException) as info:
        wrapper.predict(infer_and_parse_data(json.loads(json.dumps(protocol.encode_request([row])))))
    return info.value


@pytest.mark.parametrize("forge", [forgeries.other_moduli, forgeries.missing_galois_keys])
def test_a_context_whose_keys_do_not_fit_the_model_is_model_mismatch(compiled, digits, forge):
    error = _predict(ckks._CKKSModelWrapper(compiled), forge(compiled, digits.x_test[:2]))
    assert error.get_http_status_code() == 400
    assert error.json_kwargs[protocol.ERROR_CODE_FIELD] == "MODEL_MISMATCH", error.message


class Exploding:
    """The real model, except that evaluation fails the way a bug would."""

    def __init__(self, compiled: he.CompiledModel) -> None:
        self.compiled, self.params = compiled, compiled.params

    def check_context(self, context: he.PublicContext) -> None:
        self.compiled.check_context(context)

    def evaluate(self, batch: he.EncryptedBatch, context: he.PublicContext) -> he.EncryptedBatch:
        raise RuntimeError(f"bug near {__file__}")


def test_an_unexpected_failure_is_internal_error_with_the_trace_in_the_log_only(compiled, digits, caplog):
    keyring = he.Keyring(compiled, "single")
    context = keyring.public_context_bytes()
    row = protocol.EncryptedRequest(
        protocol.key_id_of(context), "single", context, keyring.encrypt(digits.x_test[:1]).to_bytes()
    )
    with caplog.at_level(logging.ERROR):
        error = _predict(ckks._CKKSModelWrapper(Exploding(compiled)), row)
    body = error.serialize_as_json()
    assert json.loads(body)[protocol.ERROR_CODE_FIELD] == "INTERNAL_ERROR" and error.get_http_status_code() == 400
    for leak in ("Traceback", 'File "', SERVER_PATH, "bug near"):
        assert leak not in body
    incident = re.search(r"incident ([0-9a-f]{12})", error.message).group(1)
    (record,) = [r for r in caplog.records if incident in r.getMessage()]
    assert "bug near" in caplog.text and record.exc_info is not None
