"""Sealed models: ``y = f(Enc(θ), x)``, the weights encrypted under the model owner's key.

What is encrypted: every affine weight and bias (the first layer's columns, the later layers'
diagonals), and every polynomial coefficient: Chebyshev fits of Relu/Sigmoid/... carry the
calibrated pre-activation interval, and ``he.nn.PolyActivation`` coefficients are trained weights.
What stays public: the architecture (:class:`~lightning_privacy.he.packing.sealed.SealedLayer`),
the CKKS parameters, the output activation, and the owner's public evaluation keys. A bare power
(``he.nn.Square``, ``Mul(x, x)``) has no coefficient to hide.

On disk a sealed model is a directory: ``sealed.json`` (versioned structure, key id and the sha256
of the two binary files), ``context.bin`` (the owner's public context: parameters, public,
relinearization and Galois keys, never a secret key) and ``weights.bin`` (the weight ciphertexts in
SEAL's seeded form). No plaintext weight is written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tenseal.sealapi as seal
from tqdm.auto import tqdm

from lightning_privacy.errors import CompilationError, EncryptionInputError, ModelMismatchError
from lightning_privacy.he import wire
from lightning_privacy.he.arithmetic import Arithmetic
from lightning_privacy.he.ciphertexts import EncryptedBatch
from lightning_privacy.he.context import PublicContext
from lightning_privacy.he.graph import OUTPUT_ACTIVATIONS, LayerGraph
from lightning_privacy.he.input_range import checked_input
from lightning_privacy.he.kernels.sealed import SealedKernel, WeightSource
from lightning_privacy.he.owner import OwnerKeyring, sealed_rotation_steps
from lightning_privacy.he.packing import SEALED
from lightning_privacy.he.packing.sealed import SealedLayer, sealed_layers, weight_values
from lightning_privacy.he.params import CKKSParams

FORMAT = "lightning-privacy-ckks-sealed"
VERSION = 1
MODEL_FILE, CONTEXT_FILE, WEIGHTS_FILE = "sealed.json", "context.bin", "weights.bin"
WEIGHTS_MAGIC = b"LPHE-SEALED1"
PLAIN_MAGIC = b"LPHE-PLAIN1"


class SealedModel:
    """A compiled model whose weights are ciphertexts under its owner's key; evaluated with public keys only.

    Build it with ``CompiledModel.seal(owner_keyring)`` (owner side) or :meth:`load` (host side).

    Args:
        layers: the sealed structure, in evaluation order.
        params: CKKS parameters (those of the compiled model).
        context: the owner's public context (no secret key).
        weights: serialized weight ciphertexts by name (:meth:`SealedLayer.names`).
        input_name: name of the graph input value.
        input_shape: per-sample input shape.
        output_name: name of the output value.
        output_dim: output features.
        output_activation: ``None``, ``"softmax"`` or ``"log_softmax"`` (applied by the owner).

    Raises:
        ModelMismatchError: ``weights`` lack a ciphertext the layers name, or hold others.

    Example::

        owner = he.OwnerKeyring(compiled)
        compiled.seal(owner).save("sealed")               # owner side; no plaintext weight inside
        sealed = he.SealedModel.load("sealed")            # host side: public keys only
        out = sealed.evaluate(x)                          # plaintext inputs from the owner's front end
        logits = owner.decrypt(out)                       # owner side
    """

    def __init__(
        self,
        layers: list[SealedLayer],
        params: CKKSParams,
        context: PublicContext,
        weights: dict[str, bytes],
        input_name: str,
        input_shape: tuple[int, ...],
        output_name: str,
        output_dim: int,
        output_activation: str | None = None,
    ) -> None:
        self.layers = list(layers)
        self.params = params
        self.context = context
        self.input_name = input_name
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_name = output_name
        self.output_dim = int(output_dim)
        self.output_activation = output_activation
        expected = [name for layer in self.layers for name in layer.names(params.slots)]
        if sorted(expected) != sorted(weights):
            missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
            raise ModelMismatchError(f"sealed weights do not match the layers: missing {missing}, unexpected {extra}")
        self._blobs = {name: weights[name] for name in expected}
        loaded = wire.load_objects(list(self._blobs.values()), seal.Ciphertext, context.context, "weight ciphertext")
        self._weights = dict(zip(self._blobs, loaded, strict=True))
        self._kernel = SealedKernel(context.arithmetic, context.galois_keys, params.slots, self._stored)

    @staticmethod
    def is_saved_in(directory: str | os.PathLike) -> bool:
        """Whether ``directory`` holds a sealed model (its ``sealed.json``), not a compiled one."""
        return os.path.isfile(os.path.join(directory, MODEL_FILE))

    @property
    def key_id(self) -> str:
        """The owner's key id (sha256 of its public context); encrypted inputs must carry it."""
        return self.context.key_id

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def chunks(self) -> int:
        """Ciphertexts per encrypted input sample (the first layer's column chunks)."""
        return self.layers[0].columns(self.params.slots).chunks

    @property
    def weight_bytes(self) -> int:
        """Size of the serialized weight ciphertexts."""
        return sum(len(b) for b in self._blobs.values())

    def _stored(self, name: str, parms_id, scale: float) -> seal.Ciphertext:
        ct = self._weights[name]
        if ct.parms_id() != parms_id or not abs(ct.scale / scale - 1.0) <= 1e-9:
            raise ModelMismatchError(
                f"weight ciphertext {name!r} was sealed for another level or scale than this evaluation needs; "
                "seal the model again with CompiledModel.seal"
            )
        return ct

    def evaluate(self, inputs: np.ndarray | EncryptedBatch, *, progress: bool = False) -> EncryptedBatch:
        """Host side: the model on plaintext ``inputs`` ``(n, *input_shape)`` or on inputs the owner encrypted.

        The output is encrypted under the owner's key whatever the inputs were: only the owner's
        keyring decrypts it (``OwnerKeyring.decrypt``).

        Raises:
            EncryptionInputError: plaintext inputs of the wrong shape or not finite; an encrypted
                batch of another layout, under another key, with the wrong number of ciphertexts,
                or not fresh (level, size, scale).
        """
        samples = self._encrypted_inputs(inputs) if isinstance(inputs, EncryptedBatch) else self._plain_inputs(inputs)
        outputs = [self._sample(chunks) for chunks in tqdm(samples, desc="samples", disable=not progress, leave=False)]
        return EncryptedBatch(SEALED, len(samples), outputs, self.context)

    def _plain_inputs(self, x: np.ndarray) -> list[list[seal.Plaintext | seal.Ciphertext | None]]:
        x = checked_input(x, self.input_shape)
        arith, top = self.context.arithmetic, self.context.context.first_parms_id()
        samples = []
        for chunks in self.layers[0].columns(self.params.slots).inputs(x.reshape(len(x), -1)):
            # SEAL refuses a product with an all-zero plaintext (a transparent ciphertext): such a
            # chunk adds nothing and is skipped; an all-zero sample is encrypted with the public key.
            encoded = [arith.encode(v, top, self.params.scale) if np.any(v) else None for v in chunks]
            if all(p is None for p in encoded):
                encoded[0] = seal.Ciphertext()
                arith.encryptor.encrypt(arith.encode(chunks[0], top, self.params.scale), encoded[0])
            samples.append(encoded)
        return samples

    def _encrypted_inputs(self, batch: EncryptedBatch) -> list[list[seal.Ciphertext]]:
        if batch.layout != SEALED or batch.context.key_id != self.key_id:
            raise EncryptionInputError(
                "encrypted inputs of a sealed model must be OwnerKeyring.encrypt(x) of the owner's keyring "
                f"(got layout {batch.layout!r}, key_id {batch.context.key_id[:12]}; model key_id {self.key_id[:12]})"
            )
        cts, chunks = batch.ciphertexts, self.chunks
        if len(cts) != batch.n_samples * chunks:
            raise EncryptionInputError(f"expected {batch.n_samples * chunks} ciphertexts, got {len(cts)}")
        top = self.context.context.first_parms_id()
        for ct in cts:
            if ct.parms_id() != top or ct.size() != 2 or not abs(ct.scale / self.params.scale - 1) <= 1e-9:
                raise EncryptionInputError(
                    "ciphertexts must be fresh encryptions from OwnerKeyring.encrypt (level, size or scale differ)"
                )
        return [cts[i * chunks : (i + 1) * chunks] for i in range(batch.n_samples)]

    def _sample(self, chunks: list) -> seal.Ciphertext:
        return run(self.layers, self.output_name, chunks, self._kernel)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``sealed.json``, ``context.bin`` and ``weights.bin`` into ``directory`` (created if needed)."""
        os.makedirs(directory, exist_ok=True)
        context = self.context.to_bytes()
        weights = wire.pack_sections(WEIGHTS_MAGIC, {"names": list(self._blobs)}, list(self._blobs.values()))
        document = {
            "format": FORMAT,
            "version": VERSION,
            "params": self.params.to_dict(),
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "output_name": self.output_name,
            "output_dim": self.output_dim,
            "output_activation": self.output_activation,
            "layers": [layer.to_dict() for layer in self.layers],
            "key_id": self.key_id,
            "sha256": {CONTEXT_FILE: _sha256(context), WEIGHTS_FILE: _sha256(weights)},
        }
        for name, data in ((CONTEXT_FILE, context), (WEIGHTS_FILE, weights)):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        with open(os.path.join(directory, MODEL_FILE), "w") as f:
            json.dump(document, f, indent=1)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SealedModel:
        """Read a sealed model written by :meth:`save`, validating all of it first.

        Raises:
            CompilationError: missing files, another format or version, files that do not match
                the hashes in ``sealed.json``, or a malformed structure; the message names the file.
            SecretKeyExposureError: ``context.bin`` holds a secret key.
        """
        paths = {name: os.path.join(directory, name) for name in (MODEL_FILE, CONTEXT_FILE, WEIGHTS_FILE)}
        for path in paths.values():
            if not os.path.isfile(path):
                raise CompilationError(f"{path}: missing; a sealed model directory holds {sorted(paths)}")
        try:
            with open(paths[MODEL_FILE]) as f:
                document = json.load(f)
        except (OSError, ValueError) as exc:
            raise CompilationError(f"{paths[MODEL_FILE]}: not a readable JSON document: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != VERSION:
            raise CompilationError(f"{paths[MODEL_FILE]}: not a {FORMAT} version {VERSION} document")
        data = {}
        for name in (CONTEXT_FILE, WEIGHTS_FILE):
            with open(paths[name], "rb") as f:
                data[name] = f.read()
            if document.get("sha256", {}).get(name) != _sha256(data[name]):
                raise CompilationError(f"{paths[name]}: content does not match the sha256 in {MODEL_FILE}")
        context = PublicContext.from_bytes(data[CONTEXT_FILE])
        try:
            params = CKKSParams(
                **{**document["params"], "coeff_mod_bit_sizes": tuple(document["params"]["coeff_mod_bit_sizes"])}
            )
            layers = [SealedLayer.from_dict(entry) for entry in document["layers"]]
            header, blobs = wire.unpack_sections(WEIGHTS_MAGIC, data[WEIGHTS_FILE], "sealed weights")
            weights = dict(zip(header["names"], blobs, strict=True))
            activation = document["output_activation"]
            if activation is not None and activation not in OUTPUT_ACTIVATIONS:
                raise ValueError(f"unknown output activation {activation!r}")
            if context.params != params or context.key_id != document["key_id"] or context.layout != SEALED:
                raise ValueError("context.bin was made for other parameters, another key or another layout")
            if context.rotation_steps != sealed_rotation_steps(layers):
                raise ValueError("context.bin holds Galois keys for other rotation steps than the layers use")
            return cls(
                layers,
                params,
                context,
                weights,
                str(document["input_name"]),
                tuple(int(d) for d in document["input_shape"]),
                str(document["output_name"]),
                int(document["output_dim"]),
                activation,
            )
        except (KeyError, TypeError, ValueError, EncryptionInputError) as exc:
            raise CompilationError(f"{paths[MODEL_FILE]}: invalid sealed model: {exc}") from exc

    def __repr__(self) -> str:
        return (
            f"SealedModel(input_shape={self.input_shape}, output_dim={self.output_dim}, "
            f"N={self.params.poly_modulus_degree}, layers={len(self.layers)}, key_id={self.key_id[:12]})"
        )


def pack_plain_inputs(x: np.ndarray) -> bytes:
    """Plaintext inputs for a sealed model's host, as bytes (from the owner's front end)."""
    x = np.ascontiguousarray(x, dtype="<f8")
    return wire.pack_sections(PLAIN_MAGIC, {"shape": list(x.shape)}, [x.tobytes()])


def unpack_plain_inputs(data: bytes) -> np.ndarray:
    """The inverse of :func:`pack_plain_inputs`.

    Raises:
        EncryptionInputError: garbage, or a shape that does not match the bytes.
    """
    header, sections = wire.unpack_sections(PLAIN_MAGIC, data, "plaintext input")
    shape = header.get("shape")
    if (
        len(sections) != 1
        or not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and d > 0 for d in shape)
        or int(np.prod(shape)) * 8 != len(sections[0])
    ):
        raise EncryptionInputError(
            f"corrupted plaintext input (shape {shape!r}, {len(sections[0]) if sections else 0} bytes)"
        )
    return np.frombuffer(sections[0], dtype="<f8").reshape(shape)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(layers: list[SealedLayer], output_name: str, chunks: list, kernel: SealedKernel) -> seal.Ciphertext:
    """One sample through the sealed layers; ``chunks`` are the first layer's inputs (plaintexts or ciphertexts)."""
    values: dict[str, seal.Ciphertext] = {}
    arith = kernel.arith
    for layer in layers:
        if layer.kind == "columns":
            out = kernel.columns(layer, chunks)
        elif layer.kind == "diagonals":
            out = kernel.diagonals(layer, values[layer.inputs[0]])
        elif layer.kind == "bias":
            out = kernel.bias(layer, values[layer.inputs[0]])
        elif layer.kind == "polynomial":
            out = kernel.polynomial(layer, values[layer.inputs[0]])
        elif layer.kind == "add":
            out = arith.add(values[layer.inputs[0]], values[layer.inputs[1]])
        else:
            out = arith.multiply(values[layer.inputs[0]], values[layer.inputs[1]])
        values[layer.output] = out
    return values[output_name]


def seal_model(graph: LayerGraph, params: CKKSParams, owner: OwnerKeyring) -> SealedModel:
    """Owner side: encrypt the weights of a compiled ``graph`` under ``owner``'s key.

    One evaluation on a plaintext input decides the level and scale of every weight ciphertext
    (the ones the host's evaluation will ask for); each weight is encrypted at those on first use.

    Raises:
        CompilationError: the graph does not start with one linear layer reading the input.
        ModelMismatchError: ``owner`` was made for another model (parameters or structure).
    """
    layers = sealed_layers(graph, params.slots)
    if owner.params != params or owner.layers != layers:
        raise ModelMismatchError("the OwnerKeyring was made for another model; use OwnerKeyring(compiled)")
    values = weight_values(graph, layers, params.slots)
    context = owner.public_context
    blobs: dict[str, bytes] = {}
    loaded: dict[str, seal.Ciphertext] = {}

    def encrypting(name: str, parms_id, scale: float) -> seal.Ciphertext:
        if name not in loaded:
            (blobs[name],) = wire.save_objects([owner.encrypt_weight(values[name], parms_id, scale)])
            (loaded[name],) = wire.load_objects([blobs[name]], seal.Ciphertext, context.context, "weight ciphertext")
        return loaded[name]

    source: WeightSource = encrypting
    kernel = SealedKernel(
        Arithmetic(context.context, context.public_key, context.relin_keys, params.scale),
        context.galois_keys,
        params.slots,
        source,
    )
    arith, top = kernel.arith, context.context.first_parms_id()
    probe = [arith.encode(np.ones(params.slots), top, params.scale)] * layers[0].columns(params.slots).chunks
    run(layers, graph.output_name, probe, kernel)
    return SealedModel(
        layers,
        params,
        context,
        blobs,
        graph.input_name,
        tuple(graph.input_shape),
        graph.output_name,
        graph.output_dim,
        graph.output_activation,
    )
