"""The ckks flavor in-process: save/load, log/register with privacy tags, pyfunc and the client."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from mlflow.exceptions import MlflowException
from packaging.requirements import Requirement
from packaging.version import Version

from lightning_privacy import he
from lightning_privacy.errors import CompilationError
from lightning_privacy.mlflow_plugins import ContextCache, EncryptedClient, ckks, protocol
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest
from tests.mlflow_plugins.conftest import assert_matches_reference

PRIVACY_TAGS = {
    "privacy.epsilon": "2.97",
    "privacy.delta": "1e-05",
    "privacy.noise_multiplier": "1.1",
    "privacy.max_grad_norm": "1.0",
    "privacy.accountant": "prv",
}
#: What training and compiling need and serving must not: top-level import names and distributions.
TRAINING_ONLY_MODULES = (
    "torch", "functorch", "torchgen", "torchmetrics", "pytorch_lightning", "lightning", "lightning_fabric",
    "lightning_utilities", "opacus", "onnx", "onnxruntime", "onnxscript", "onnx_ir",
)  # fmt: skip
TRAINING_ONLY_DISTRIBUTIONS = ("torch", "pytorch-lightning", "lightning", "opacus", "onnx", "onnxruntime", "onnxscript")


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
    assert _bundled_wheel(tmp_path / "model").name.startswith("lightning_privacy-")


def test_flavor_uses_only_public_mlflow_names():
    """MLflow's private names change without notice; what is unavoidable lives in _mlflow_fence.py."""
    tree = ast.parse(Path(ckks.__file__).read_text())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            private += [node.module] if any(p.startswith("_") for p in node.module.split(".")) else []
        elif isinstance(node, ast.Import):
            private += [a.name for a in node.names if a.name.startswith("mlflow") and "._" in a.name]
    assert private == []


def test_extra_files_and_code_paths_travel_with_the_model(compiled, tmp_path):
    (tmp_path / "notes.txt").write_text("calibrated on digits")
    (tmp_path / "helper.py").write_text("VALUE = 1\n")
    ckks.save_model(
        compiled,
        tmp_path / "model",
        extra_files=[str(tmp_path / "notes.txt")],
        code_paths=[str(tmp_path / "helper.py")],
    )
    mlmodel = yaml.safe_load((tmp_path / "model" / "MLmodel").read_text())
    (extra,) = mlmodel["flavors"]["ckks"]["extra_files"]
    assert (tmp_path / "model" / extra["path"]).read_text() == "calibrated on digits"
    code = mlmodel["flavors"]["python_function"]["code"]
    assert mlmodel["flavors"]["ckks"]["code"] == code
    assert (tmp_path / "model" / code / "helper.py").read_text() == "VALUE = 1\n"
    assert mlflow.pyfunc.load_model(str(tmp_path / "model")).get_raw_model().params == compiled.params


def test_load_model_from_a_run_uri_and_refuses_other_flavors(compiled, tmp_path):
    with mlflow.start_run() as run:
        ckks.log_model(compiled, name="model")
        mlflow.pyfunc.log_model(name="other", python_model=_Echo(), pip_requirements=["mlflow"])
    loaded = ckks.load_model(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path))
    assert loaded.params == compiled.params
    with pytest.raises(MlflowException, match="ckks"):
        ckks.load_model(f"runs:/{run.info.run_id}/other")


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def _requirement_names(lines: list[str]) -> set[str]:
    return {re.split(r"[\s=<>!~;\[]", line, maxsplit=1)[0].lower().replace("_", "-") for line in lines}


def _bundled_wheel(model_dir: Path) -> Path:
    """The wheel of lightning-privacy in the model, which requirements.txt installs from the model's
    ``wheels/`` (a folder relative to requirements.txt, so any working directory does); its version
    has a local label no package index can hold, so an index's lightning-privacy never replaces it."""
    lines = (model_dir / "requirements.txt").read_text().splitlines()
    assert "--find-links wheels" in lines
    (pin,) = [Requirement(line) for line in lines if line.startswith("lightning-privacy")]
    (wheel,) = (model_dir / "wheels").glob("lightning_privacy-*.whl")
    version = Version(wheel.name.split("-")[1])
    assert version.local and pin.specifier.contains(version)
    return wheel


def test_saved_model_carries_the_project_wheel_and_only_serving_requirements(compiled, tmp_path):
    ckks.save_model(compiled, tmp_path / "model")
    lines = [line for line in (tmp_path / "model" / "requirements.txt").read_text().splitlines() if line]
    names = _requirement_names([line for line in lines if not line.startswith("--")])
    assert {"lightning-privacy", "tenseal", "numpy", "pandas", "scipy", "mlflow"} <= names
    assert not names & set(TRAINING_ONLY_DISTRIBUTIONS)
    conda = yaml.safe_load((tmp_path / "model" / "conda.yaml").read_text())
    (pip_section,) = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict)]
    assert sorted(pip_section) == sorted(lines)

    with zipfile.ZipFile(_bundled_wheel(tmp_path / "model")) as wheel:
        files = set(wheel.namelist())
        (metadata,) = [n for n in files if n.endswith(".dist-info/METADATA")]
        requires = [line.split(":", 1)[1].strip() for line in wheel.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]  # fmt: skip
        assert wheel.testzip() is None
    for module in ("mlflow_plugins/ckks.py", "mlflow_plugins/protocol.py", "he/packing/batch.py", "errors.py"):
        assert f"lightning_privacy/{module}" in files
    assert not _requirement_names(requires) & set(TRAINING_ONLY_DISTRIBUTIONS)


def _site_without_training_packages(tmp_path: Path) -> Path:
    """This environment's site-packages, less the training-only packages and their metadata."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    blocked = {m.lower() for m in TRAINING_ONLY_MODULES}
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top not in blocked:
            (site_dir / entry.name).symlink_to(entry)
    return site_dir


def test_saved_model_loads_and_predicts_without_torch_lightning_opacus_or_onnx(compiled, digits, reference, tmp_path):
    ckks.save_model(compiled, tmp_path / "model")
    keyring = he.Keyring(compiled, "batch")
    context = keyring.public_context_bytes()
    x = digits.x_test[:32]
    row = EncryptedRequest(protocol.key_id_of(context), "batch", context, keyring.encrypt(x).to_bytes())
    (tmp_path / "request.json").write_text(json.dumps(protocol.encode_request([row])))
    script = textwrap.dedent(
        f"""
        import importlib.util, json, site, sys
        site.addsitedir({str(_site_without_training_packages(tmp_path))!r})
        blocked = {TRAINING_ONLY_MODULES!r}
        assert not [m for m in blocked if importlib.util.find_spec(m)], "the training packages are still there"

        import mlflow
        import pandas as pd
        import lightning_privacy.mlflow_plugins.ckks

        model = mlflow.pyfunc.load_model({str(tmp_path / "model")!r})
        split = json.load(open("request.json"))["dataframe_split"]
        answer = model.predict(pd.DataFrame(split["data"], columns=split["columns"]))
        json.dump(
            {{"ciphertexts": list(answer["ciphertext"]),
             "imported": sorted(m for m in sys.modules if m.split(".")[0] in blocked)}},
            open("response.json", "w"),
        )
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    response = json.loads((tmp_path / "response.json").read_text())
    assert response["imported"] == []
    (ciphertext,) = protocol.decode_response({"predictions": [{"ciphertext": c} for c in response["ciphertexts"]]})
    logits = keyring.decrypt(he.EncryptedBatch.from_bytes(ciphertext, keyring.public_context))
    assert_matches_reference(logits, reference(x))


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


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process and all it spawned (uvicorn), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def _index_reachable() -> bool:
    try:
        return requests.get("https://pypi.org/simple/tenseal/", timeout=10).ok
    except requests.RequestException:
        return False


@pytest.mark.slow
def test_requirements_resolve_with_pip_from_another_working_directory(compiled, tmp_path):
    """What `mlflow models build-docker -m URI` runs in its image: pip install -r <model>/requirements.txt,
    from a working directory that is not the model's."""
    if not _index_reachable():
        pytest.skip("pypi.org is unreachable; pip resolves the model's other requirements there")
    ckks.save_model(compiled, tmp_path / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
               "--report", "report.json", "-r", str(tmp_path / "model" / "requirements.txt")]  # fmt: skip
    result = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    installs = {i["metadata"]["name"]: i for i in json.loads((elsewhere / "report.json").read_text())["install"]}
    url = installs["lightning-privacy"]["download_info"]["url"]
    assert url == (tmp_path / "model" / "wheels").resolve().joinpath(_bundled_wheel(tmp_path / "model").name).as_uri()


@pytest.mark.slow
def test_model_is_served_from_an_environment_built_from_the_model_alone(compiled, digits, reference, tmp_path):
    """`mlflow models serve --env-manager uv`: a new virtual environment from the model's requirements."""
    if not _index_reachable():
        pytest.skip("pypi.org is unreachable; the served model's environment is installed from it")
    ckks.save_model(compiled, tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    envs = tmp_path / "envs"
    env = {
        **os.environ,
        # uv comes with the test extra, next to this interpreter; the interpreter itself is not downloaded.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "MLFLOW_ENV_ROOT": str(envs),
        "UV_PYTHON_DOWNLOADS": "never",
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(tmp_path / "model"),
               "--env-manager", "uv", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 480
        while True:
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "no /ping in 8 min:\n" + log.read_text(errors="replace")[-4000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        x = digits.x_test[:16]
        with EncryptedClient(str(tmp_path / "model"), url=f"http://127.0.0.1:{port}", layout="batch") as client:
            assert_matches_reference(client.predict_logits(x), reference(x))
    finally:
        _stop_group(process)
    (site_packages,) = envs.glob("*/lib/python*/site-packages")
    installed = {p.name.split("-")[0].lower() for p in site_packages.glob("*.dist-info")}
    assert "lightning_privacy" in installed
    assert not installed & {d.replace("-", "_") for d in TRAINING_ONLY_DISTRIBUTIONS}
