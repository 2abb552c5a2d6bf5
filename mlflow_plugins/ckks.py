"""The ``ckks`` MLflow flavor: a compiled CKKS model whose pyfunc ``predict`` computes on ciphertexts.

This module exports MLflow Models with the following flavors:

``ckks`` (native)
    The ``lightning_privacy.he.CompiledModel`` (``model.json`` + ``weights.npz``); load it back
    with :func:`load_model`.
:py:mod:`mlflow.pyfunc`
    For ``mlflow models serve``: ``predict`` takes and returns ciphertexts in the format of
    :mod:`lightning_privacy.mlflow_plugins.protocol`; use ``EncryptedClient`` to talk to it.

Example::

    with mlflow.start_run():  # the run that carries privacy.* tags from DP training
        info = ckks.log_model(
            model, name="model", calibration_data=X_train, registered_model_name="digits-ckks"
        )
    # mlflow models serve -m models:/digits-ckks/1 -p 5001 --env-manager uv   (or virtualenv, local)
    # mlflow models build-docker -m models:/digits-ckks/1 -n digits-ckks
    # The model carries lightning-privacy's wheel (``wheels/``) and requires only the HE runtime,
    # numpy, scipy, pandas, tqdm and MLflow: no torch, Lightning, Opacus or ONNX.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo

import lightning_privacy
from lightning_privacy import he
from lightning_privacy.errors import (
    CompilationError,
    EncryptedRequestError,
    EncryptionInputError,
    ModelMismatchError,
    SecretKeyExposureError,
    ServingConfigError,
)
from lightning_privacy.he.perturbation import perturb
from lightning_privacy.mlflow_plugins import _mlflow_fence, bundled_wheel, protocol
from lightning_privacy.mlflow_plugins.context_cache import ContextCache
from lightning_privacy.mlflow_plugins.context_spill import ContextSpill
from lightning_privacy.mlflow_plugins.defences import LEDGER_DIR, QueryLedger, ServingDefences
from lightning_privacy.mlflow_plugins.privacy_tags import copy_privacy_tags
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest, ErrorCode
from lightning_privacy.mlflow_plugins.request_limits import RequestLimits
from lightning_privacy.mlflow_plugins.sealed_model import SealedModelWrapper

FLAVOR_NAME = "ckks"
#: Run tags copied onto the registered model version (written by the DifferentialPrivacy callback).

_MODEL_DATA_SUBPATH = "compiled"
#: Folder of the model that holds the wheel of lightning-privacy (``bundled_wheel``).
_WHEELS_SUBPATH = "wheels"
#: Folder of the model for ``extra_files`` (MLflow's flavors use the same name and flavor key).
_EXTRA_FILES = "extra_files"
#: MLflow's default wait for a new registered model version to become ready, in seconds.
_AWAIT_REGISTRATION_SECONDS = 300
#: What a served model imports besides lightning-privacy and MLflow (MLflow adds itself): the HE
#: runtime and the numerics under it. Not torch, Lightning, Opacus or ONNX: they export and compile.
_SERVING_DISTRIBUTIONS = ("tenseal", "numpy", "scipy", "pandas", "tqdm")


def get_default_pip_requirements() -> list[str]:
    """What serving a model of this flavor needs, pinned to the installed versions.

    lightning-privacy itself is not on a package index: :func:`save_model` writes its wheel into
    the model's ``wheels/`` and lists it in ``requirements.txt`` before these.
    """
    return [f"{name}=={importlib.metadata.version(name)}" for name in _SERVING_DISTRIBUTIONS]


def get_default_conda_env() -> dict[str, Any]:
    """The conda environment of models saved by this flavor (as MLflow writes ``conda.yaml``)."""
    pip = [f"mlflow=={mlflow.__version__}", *get_default_pip_requirements()]
    return {
        "name": "mlflow-env",
        "channels": ["conda-forge"],
        "dependencies": [f"python={platform.python_version()}", "pip", {"pip": pip}],
    }


def save_model(
    ckks_model: Any,
    path: str | os.PathLike[str],
    calibration_data: np.ndarray | None = None,
    example_input: Any = None,
    compile_options: dict[str, Any] | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    pip_requirements: Any = None,
    extra_pip_requirements: Any = None,
    metadata: dict[str, Any] | None = None,
    extra_files: Any = None,
    defences: ServingDefences | None = None,
) -> None:
    """Save a CKKS model to a local directory in MLflow format.

    Args:
        ckks_model: a ``he.CompiledModel``, a ``he.SealedModel`` (weights encrypted under its
            owner's key: the artifacts hold no plaintext weight; served with the owner's public keys),
            or a ``torch.nn.Module`` / ONNX model (``ModelProto``, path or bytes) that is exported and
            compiled here.
        path: directory to create.
        calibration_data: inputs (n, *input_shape) that set activation ranges; needed to compile.
        example_input: input for ``torch.onnx.export``; default ``calibration_data[:1]``.
        compile_options: extra keyword arguments of ``he.compile``.
        conda_env, code_paths, mlflow_model, pip_requirements, extra_pip_requirements, metadata,
        extra_files: as in ``mlflow.onnx.save_model``. The model carries the wheel of
        lightning-privacy (``wheels/``), and ``requirements.txt`` installs it first whatever
        ``pip_requirements`` say; a ``conda_env`` replaces the environment as given. There is no
        ``signature`` or ``input_example``: MLflow would enforce a schema before the model sees a
        request (its errors quote the request, ciphertexts included), and an example would be
        plaintext.
        defences: opt-in model-extraction defences of the served model
            (:class:`~lightning_privacy.mlflow_plugins.defences.ServingDefences`: a per-client
            query budget, Gaussian noise on the encrypted outputs), carried as the pyfunc
            ``model_config`` in ``MLmodel``, which the pyfunc loader reads back in every server.
            Not for sealed models: their one client is the owner, who holds the weights.

    Raises:
        CompilationError: a model that needs compiling came without ``calibration_data``, or
            does not compile.
        ServingConfigError: ``defences`` for a sealed model.
        MlflowException: more than one of ``conda_env``, ``pip_requirements`` and
            ``extra_pip_requirements``, or ``path`` exists and is not empty.
    """
    if sum(arg is not None for arg in (conda_env, pip_requirements, extra_pip_requirements)) > 1:
        raise MlflowException.invalid_parameter_value(
            "Give at most one of conda_env, pip_requirements and extra_pip_requirements (as in MLflow)."
        )
    sealed = isinstance(ckks_model, he.SealedModel)  # weights encrypted: no plaintext weight is written
    if sealed and defences is not None and defences.active:
        # The owner is a sealed model's only client and holds the weights: there is nothing to
        # extract, and a defence that would not run must not be recorded as in force.
        raise ServingConfigError(
            f"Extraction defences ({defences}) apply to request-encrypted models, not sealed ones: a sealed "
            "model answers its owner only, who holds the weights. Save it without defences."
        )
    compiled = ckks_model if sealed else _compile(ckks_model, calibration_data, example_input, compile_options)
    path = os.path.abspath(path)
    if conda_env is None:
        # Always given, so MLflow does not infer them (it loads the model in a subprocess, ~10 s).
        # pip and uv resolve a relative --find-links against the requirements file, unlike a
        # relative path to the wheel itself, which pip takes from its working directory.
        project = [f"--find-links {_WHEELS_SUBPATH}", f"lightning-privacy=={lightning_privacy.__version__}"]
        listed = get_default_pip_requirements() if pip_requirements is None else _requirement_lines(pip_requirements)
        pip_requirements = [*project, *listed, *_requirement_lines(extra_pip_requirements)]
    if mlflow_model is None:
        mlflow_model = Model()
    flavor = mlflow_model.add_flavor(
        FLAVOR_NAME,
        lightning_privacy_version=lightning_privacy.__version__,
        poly_modulus_degree=int(compiled.params.poly_modulus_degree),
        input_shape=[int(d) for d in compiled.input_shape],
        output_dim=int(compiled.output_dim),
        sealed=sealed,
    ).flavors[FLAVOR_NAME]
    with tempfile.TemporaryDirectory() as staging:
        compiled.save(os.path.join(staging, _MODEL_DATA_SUBPATH))
        pyfunc.save_model(
            path,
            loader_module=__name__,
            data_path=os.path.join(staging, _MODEL_DATA_SUBPATH),
            code_paths=code_paths,
            conda_env=conda_env,
            mlflow_model=mlflow_model,
            pip_requirements=pip_requirements,
            metadata=metadata,
            model_config=defences.model_config() if defences is not None and defences.active else None,
            # The environment is requirements.txt: never a uv.lock that MLflow would pick up from
            # the working directory (it would install the training stack when served with uv).
            uv_project_path=staging,
        )
    pyfunc_conf = mlflow_model.flavors[pyfunc.FLAVOR_NAME]
    flavor.update(data=pyfunc_conf[pyfunc.DATA], code=pyfunc_conf.get(pyfunc.CODE))
    if extra_files:
        flavor[_EXTRA_FILES] = [{"path": _copy_extra_file(uri, path)} for uri in extra_files]
    # Served with `mlflow models serve` (any environment manager) from the model alone.
    bundled_wheel.write_wheel(os.path.join(path, _WHEELS_SUBPATH), get_default_pip_requirements())
    mlflow_model.model_size_bytes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def _requirement_lines(requirements: str | list[str] | None) -> list[str]:
    """pip requirement lines: a list as given, a requirements file as ``-r FILE``."""
    if requirements is None:
        return []
    return [f"-r {requirements}"] if isinstance(requirements, str) else list(requirements)


def _copy_extra_file(uri: str, path: str) -> str:
    """Download (or copy) one of ``extra_files`` into the model; its path inside the model."""
    os.makedirs(os.path.join(path, _EXTRA_FILES), exist_ok=True)
    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=os.path.join(path, _EXTRA_FILES))
    return f"{_EXTRA_FILES}/{os.path.basename(uri.rstrip('/'))}"


def log_model(
    ckks_model: Any,
    name: str | None = None,
    calibration_data: np.ndarray | None = None,
    example_input: Any = None,
    compile_options: dict[str, Any] | None = None,
    conda_env: Any = None,
    code_paths: list[str] | None = None,
    registered_model_name: str | None = None,
    await_registration_for: int = _AWAIT_REGISTRATION_SECONDS,
    pip_requirements: Any = None,
    extra_pip_requirements: Any = None,
    metadata: dict[str, Any] | None = None,
    extra_files: Any = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
    artifact_path: str | None = None,
    defences: ServingDefences | None = None,
    **kwargs: Any,
) -> ModelInfo:
    """Log a CKKS model to the active run (or as a logged model), optionally registering it.

    Arguments are those of :func:`save_model` plus MLflow's ``log_model`` arguments
    (``artifact_path`` is MLflow's deprecated spelling of ``name``). With
    ``registered_model_name``, the new model version gets every ``privacy.*`` tag of the run the
    model is logged to (ε, δ, noise multiplier, clip norm, accountant from DP training), so the
    registry shows what each version was trained at, and the ``privacy.defence.*`` tags of
    ``defences``. With ``MLFlowLogger``, log inside ``mlflow.start_run(run_id=logger.run_id)``.

    Returns:
        The ``ModelInfo`` of the logged model.
    """
    model_info = Model.log(
        artifact_path=artifact_path,
        name=name,
        flavor=sys.modules[__name__],
        ckks_model=ckks_model,
        calibration_data=calibration_data,
        example_input=example_input,
        compile_options=compile_options,
        conda_env=conda_env,
        code_paths=code_paths,
        registered_model_name=registered_model_name,
        await_registration_for=await_registration_for,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        extra_files=extra_files,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        defences=defences,
        **kwargs,
    )
    if registered_model_name is not None and model_info.registered_model_version is not None:
        copy_privacy_tags(model_info.run_id, registered_model_name, model_info.registered_model_version)
        for key, value in (defences.tags() if defences is not None else {}).items():  # privacy.defence.*
            mlflow.MlflowClient().set_model_version_tag(
                registered_model_name, model_info.registered_model_version, key, value
            )
    return model_info


def load_model(model_uri: str, dst_path: str | None = None) -> he.CompiledModel | he.SealedModel:
    """Load the ``he.CompiledModel`` (or ``he.SealedModel``) of a CKKS model from a local path or an MLflow URI.

    Args:
        model_uri: e.g. ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model`` or a local directory.
        dst_path: local directory to download the artifacts into (must exist).

    Raises:
        MlflowException: the model has no ``ckks`` flavor, or cannot be downloaded.
    """
    local_path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path)
    flavors = Model.load(local_path).flavors
    if FLAVOR_NAME not in flavors:
        raise MlflowException.invalid_parameter_value(
            f"{model_uri} has no {FLAVOR_NAME!r} flavor (it has {sorted(flavors)}); log CKKS models with "
            "lightning_privacy.mlflow_plugins.ckks.log_model."
        )
    data = os.path.join(local_path, flavors[FLAVOR_NAME]["data"])
    return he.SealedModel.load(data) if he.SealedModel.is_saved_in(data) else he.CompiledModel.load(data)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _CKKSModelWrapper | SealedModelWrapper:
    """Load the pyfunc implementation; called by ``mlflow.pyfunc.load_model``.

    In the scoring server this also makes MLflow refuse request bodies beyond the
    :class:`RequestLimits` (read from the environment) before it parses them, and, with several
    workers, makes each worker accept connections only while idle (``_mlflow_fence.AcceptGate``).

    Raises:
        ServingConfigError: a request limit in the environment is not a positive integer, or
            ``LIGHTNING_PRIVACY_ACCEPT_WHEN_IDLE`` is neither on nor off.
        UnsupportedMlflowVersionError: this MLflow has no place to check bodies before parsing.
    """
    _mlflow_fence.install_invocations_guard(RequestLimits.from_env().http_refusal)
    # Several uvicorn workers: each takes a connection only while idle, so none queues behind a busy one.
    _mlflow_fence.install_accept_gate()
    if he.SealedModel.is_saved_in(path):  # evaluated in-process with the owner's public keys
        return SealedModelWrapper(he.SealedModel.load(path))
    return _CKKSModelWrapper(he.CompiledModel.load(path), ServingDefences.from_model_config(model_config))


class _CKKSModelWrapper:
    """Evaluates encrypted requests with public contexts only; one context cache per process, and a
    spill directory shared by the processes of one server (``context_spill``)."""

    def __init__(self, compiled: he.CompiledModel, defences: ServingDefences | None = None) -> None:
        self.compiled = compiled
        self.defences = defences or ServingDefences()
        # Shared with the other uvicorn workers of the server, so each key is uploaded once per server
        # and the query budget is one per server, not one per worker.
        spill = ContextSpill.from_env()
        self.queries = QueryLedger(self.defences, directory=None if spill is None else spill.directory / LEDGER_DIR)
        self.contexts: ContextCache[he.PublicContext] = ContextCache(
            cost=lambda context: context.memory_bytes, spill=spill
        )

    def get_raw_model(self) -> he.CompiledModel:
        """The compiled model (what ``EncryptedClient`` reads its CKKS parameters from)."""
        return self.compiled

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Evaluate each request row; see :mod:`lightning_privacy.mlflow_plugins.protocol`.

        Raises:
            MlflowException: HTTP 400 with a ``lightning_privacy_code`` for a rejected request;
                ``INTERNAL_ERROR`` for any unexpected failure, whose stack trace goes to the server
                log under an incident id and never to the client (MLflow would put it in the body).
        """
        return protocol.answer(
            data,
            self._evaluate,
            "Send requests made by EncryptedClient for this model; if this one was, report the incident id.",
        )

    def _evaluate(self, row: EncryptedRequest) -> he.EncryptedBatch:
        context = self.contexts.get_or_load(row.key_id, row.context, self._public_context)
        if context.layout != row.layout:
            raise EncryptedRequestError(
                ErrorCode.MALFORMED_REQUEST,
                f"The row says layout {row.layout!r} but key {row.key_id[:16]}... was made for {context.layout!r}.",
            )
        try:
            batch = he.EncryptedBatch.from_bytes(row.ciphertext, context)
        except EncryptionInputError as e:
            raise EncryptedRequestError(ErrorCode.INVALID_CIPHERTEXT, f"The ciphertext cannot be read: {e}") from None
        self.queries.charge(row.key_id, batch.n_samples)  # opt-in query budget (defences.py)
        try:
            result = self.compiled.evaluate(batch, context)
        except EncryptionInputError as e:
            raise EncryptedRequestError(
                ErrorCode.MODEL_MISMATCH,
                f"The encrypted batch does not fit this model (input shape {tuple(self.compiled.input_shape)}): {e}",
            ) from None
        if self.defences.output_noise_std is None:
            return result
        # Opt-in output noise (defences.py): fresh CSPRNG-seeded draws for every request.
        return perturb(result, self.compiled.output_dim, self.defences.output_noise_std)

    def _public_context(self, data: bytes) -> he.PublicContext:
        try:
            context = he.PublicContext.from_bytes(data)
        except SecretKeyExposureError:
            raise EncryptedRequestError(
                ErrorCode.PRIVATE_CONTEXT,
                "The context holds a secret key; the server only accepts public contexts. The secret key "
                "must never leave the client (treat this one as compromised): send "
                "Keyring.public_context_bytes(), as EncryptedClient does.",
            ) from None
        except ModelMismatchError as e:  # a header that lies about the SEAL parameters or keys inside
            raise EncryptedRequestError(ErrorCode.MODEL_MISMATCH, f"The context does not fit this model: {e}") from None
        except EncryptionInputError as e:
            raise EncryptedRequestError(ErrorCode.INVALID_CONTEXT, f"The context cannot be read: {e}") from None
        if context.params != self.compiled.params:
            raise EncryptedRequestError(
                ErrorCode.MODEL_MISMATCH,
                f"The context was made for other CKKS parameters than this model's ({self.compiled.params}); "
                "make the keys from this model (EncryptedClient reads them from the model URI).",
            )
        try:  # the header can lie: check the SEAL parameters and keys it carries
            self.compiled.check_context(context)
        except ModelMismatchError as e:
            raise EncryptedRequestError(
                ErrorCode.MODEL_MISMATCH,
                f"The context's keys do not fit this model: {e}. Make the keys from this model "
                "(EncryptedClient reads them from the model URI).",
            ) from None
        return context


def _compile(
    model: Any,
    calibration_data: np.ndarray | None,
    example_input: Any,
    compile_options: dict[str, Any] | None,
) -> he.CompiledModel:
    if isinstance(model, he.CompiledModel):
        return model
    if calibration_data is None:
        raise CompilationError(
            f"Compiling a {type(model).__name__} to CKKS needs calibration_data (a few hundred "
            "representative inputs); or pass an already compiled he.CompiledModel."
        )
    import torch

    if isinstance(model, torch.nn.Module):
        if example_input is None:
            example_input = torch.as_tensor(np.asarray(calibration_data[:1]), dtype=torch.float32)
        model = he.export(model, example_input)
    return he.compile(model, np.asarray(calibration_data), **(compile_options or {}))
