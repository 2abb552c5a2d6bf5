"""Encrypted inference: lightning_privacy.he against the TenSEAL-tutorial style, one table per run.

Models:
  (a) digits MLP 64-32-10 with square activation (trained briefly on scikit-learn digits);
  (b) TenSEAL's MNIST-tutorial CNN: conv 4x7x7 stride 3 -> square -> fc 256->64 -> square -> fc 64->10
      on 28x28 inputs (random weights and inputs: timing only);
  (c) a small CNN on digits: conv 4x3x3 -> square -> avgpool 2 -> fc 36->10 (trained briefly).

Columns: server time per sample in the single layout (in-process, and split over 2 forked
processes: the fork copies the page tables of this process, about 2 GB once (a) and (b) have run
in the batch layout, and the child's exit unmaps them, tens of ms either way, more than (c)'s 3
samples of ~30 ms, split 2 + 1, can win back; see ``he.parallel``), amortized per sample in the batch layout at
1024 and 4096 samples, ciphertext bytes per sample (request), public-context bytes, and max absolute
error of the decrypted logits against onnxruntime on the same ONNX file. The baseline encrypts one
``CKKSVector`` per sample, chains ``.mm`` (``im2col`` convolution for the CNNs, as in the tutorial),
adds biases with ``+``, and ships all default Galois keys.

A second table has the sealed rows (``y = f(Enc(θ), x)``, weights encrypted under the owner's key):
server time per sample with plaintext inputs and with owner-encrypted inputs, max error against
onnxruntime, the sealed weights, the owner's public keys and the saved directory (what the host holds),
and the upload per encrypted sample.

A third table follows the compiler at real input sizes (issue 15): (a) the digits MLP and a small
CNN -- conv 3->8 3x3 stride 2 pad 1 -> square -> avgpool 2 -> fc -> 10, random weights and
inputs -- on 3x32x32 and 3x64x64: compile time, the compile's peak allocation (tracemalloc, which
numpy reports to) and the peak resident memory of the fresh process that compiles the ONNX bytes
(VmHWM, imports of torch and TenSEAL included),
N, single-layout time per sample (best of 3 after a warm-up, in-process) and max error against
onnxruntime, with the figures measured before the structural lowering and their ratios. The
3x64x64 input (12288 values) is sent as two ciphertexts per sample at N=16384
(``packing.single.input_chunks``), since only its strided conv's output must fit one.

Run: ``python benchmarks/he_inference.py`` (a few minutes on 2 cores); ``--sealed-only`` prints the
sealed table alone, ``--compiler-only`` the compiler table alone.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tenseal as ts
import torch
from sklearn.datasets import load_digits

import lightning_privacy.he as he

SINGLE_SAMPLES = {"a": 5, "b": 3, "c": 3}
BATCH_SIZES = (1024, 4096)
BASELINE_SAMPLES = 3


def _train(net: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30) -> torch.nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return net.eval()


class TutorialCNN(torch.nn.Module):
    def __init__(self, side: int, kernel: int, stride: int, hidden: int | None, pool: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, kernel, stride=stride)
        self.pool = torch.nn.AvgPool2d(2) if pool else torch.nn.Identity()
        self.conv_side = (side - kernel) // stride + 1
        flat = 4 * (self.conv_side // 2 if pool else self.conv_side) ** 2
        self.fc1 = torch.nn.Linear(flat, hidden or 10)
        self.fc2 = torch.nn.Linear(hidden, 10) if hidden else None

    def forward(self, x):
        h = self.pool(he.nn.Square()(self.conv(x))).flatten(1)
        h = self.fc1(h)
        return self.fc2(h * h) if self.fc2 is not None else h


def build_models() -> dict[str, tuple[torch.nn.Module, np.ndarray]]:
    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    reps = int(np.ceil(max(BATCH_SIZES) / len(x)))
    x_big = np.tile(x, (reps, 1))[: max(BATCH_SIZES)]
    mlp = _train(
        torch.nn.Sequential(torch.nn.Linear(64, 32), he.nn.Square(), torch.nn.Linear(32, 10)), x, digits.target
    )
    small = _train(TutorialCNN(8, 3, 1, None, pool=True), x.reshape(-1, 1, 8, 8), digits.target)
    mnist = TutorialCNN(28, 7, 3, 64).eval()
    rng = np.random.default_rng(0)
    return {
        "a": (mlp, x_big),
        "b": (mnist, rng.uniform(0, 1, size=(max(BATCH_SIZES), 1, 28, 28)).astype(np.float32)),
        "c": (small, x_big.reshape(-1, 1, 8, 8)),
    }


def ours(net: torch.nn.Module, x: np.ndarray, single_n: int) -> dict:
    proto = he.export(net, torch.as_tensor(x[:1]))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"input": x})[0]
    model = he.compile(proto, x)
    row = {"N": model.params.poly_modulus_degree, "depth": model.depth, "errors": []}

    keys = he.Keyring(model, "single")
    row["single_keys"] = len(keys.public_context_bytes())
    payload = keys.encrypt(x[:single_n]).to_bytes()
    row["single_ct"] = len(payload) / single_n
    enc = he.EncryptedBatch.from_bytes(payload, keys.public_context)  # as the server receives it
    model.evaluate(keys.encrypt(x[:1]), keys.public_context)  # encodes and caches the diagonals once
    start = time.perf_counter()
    out = model.evaluate(enc, keys.public_context)
    row["single_ms"] = (time.perf_counter() - start) * 1e3 / single_n
    row["errors"].append(np.abs(keys.decrypt(out) - reference[:single_n]).max())
    start = time.perf_counter()
    model.evaluate(enc, keys.public_context, workers=2)
    row["single2_ms"] = (time.perf_counter() - start) * 1e3 / single_n

    keys = he.Keyring(model, "batch")
    row["batch_keys"] = len(keys.public_context_bytes())
    for n in BATCH_SIZES:
        payload = keys.encrypt(x[:n]).to_bytes()
        enc = he.EncryptedBatch.from_bytes(payload, keys.public_context)  # as the server receives it
        start = time.perf_counter()
        out = model.evaluate(enc, keys.public_context)
        row[f"batch{n}_ms"] = (time.perf_counter() - start) * 1e3 / n
        if n == max(BATCH_SIZES):
            row["batch_ct"] = len(payload) / n
        row["errors"].append(np.abs(keys.decrypt(out) - reference[:n]).max())
    row["error"] = max(row.pop("errors"))
    return row


def baseline(net: torch.nn.Module, x: np.ndarray, n: int) -> dict:
    """The TenSEAL tutorial: one CKKSVector per sample, chained .mm, all power-of-two Galois keys."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[31, 26, 26, 26, 26, 26, 26, 31])
    context.global_scale = 2**26
    context.generate_galois_keys()
    public = context.copy()
    public.make_context_public()
    reference = net(torch.as_tensor(x[:n])).detach().numpy()
    conv = getattr(net, "conv", None)
    elapsed, errors, ct_bytes = 0.0, [], 0
    for sample, expected in zip(x[:n], reference, strict=True):
        if conv is None:
            enc = ts.ckks_vector(context, sample.tolist())
        else:
            enc, windows = ts.im2col_encoding(
                context, sample[0].tolist(), conv.kernel_size[0], conv.kernel_size[1], conv.stride[0]
            )
        ct_bytes += len(enc.serialize())
        start = time.perf_counter()
        if conv is None:
            lin1, lin2 = net[0], net[2]
            h = enc.mm(lin1.weight.detach().numpy().T.tolist()) + lin1.bias.detach().numpy().tolist()
            h.square_()
            out = h.mm(lin2.weight.detach().numpy().T.tolist()) + lin2.bias.detach().numpy().tolist()
        else:
            kernels, biases = conv.weight.detach().numpy(), conv.bias.detach().numpy()
            channels = [
                enc.conv2d_im2col(k[0].tolist(), windows) + float(b) for k, b in zip(kernels, biases, strict=True)
            ]
            h = ts.CKKSVector.pack_vectors(channels)
            h.square_()
            h = h.mm(_linear_after_conv(net).tolist()) + net.fc1.bias.detach().numpy().tolist()
            if net.fc2 is not None:
                h.square_()
                h = h.mm(net.fc2.weight.detach().numpy().T.tolist()) + net.fc2.bias.detach().numpy().tolist()
            out = h
        elapsed += time.perf_counter() - start
        errors.append(np.abs(np.array(out.decrypt()) - expected).max())
    return {
        "single_ms": elapsed * 1e3 / n,
        "single_ct": ct_bytes / n,
        "keys": len(public.serialize()),
        "error": max(errors),
    }


def sealed(net: torch.nn.Module, x: np.ndarray, n: int) -> dict:
    """The sealed mode on the host: plaintext and owner-encrypted inputs, one sample per call."""
    proto = he.export(net, torch.as_tensor(x[:1]))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"input": x[:n]})[0]
    model = he.compile(proto, x)
    owner = he.OwnerKeyring(model)
    start = time.perf_counter()
    sealed_model = model.seal(owner)
    row = {"seal_s": time.perf_counter() - start, "errors": []}
    with tempfile.TemporaryDirectory() as directory:
        sealed_model.save(directory)
        row["artifact"] = sum(f.stat().st_size for f in Path(directory).iterdir())
    row["weights"], row["keys"] = sealed_model.weight_bytes, len(owner.public_context_bytes())
    encrypted = [
        he.EncryptedBatch.from_bytes(owner.encrypt(x[i : i + 1]).to_bytes(), owner.public_context) for i in range(n)
    ]
    row["upload"] = len(owner.encrypt(x[:1]).to_bytes())  # seeded ciphertexts, as the owner sends them
    sealed_model.evaluate(x[:1])  # warm-up
    for mode, inputs in (("plain", [x[i : i + 1] for i in range(n)]), ("encrypted", encrypted)):
        outputs, start = [], time.perf_counter()
        for sample in inputs:
            outputs.append(sealed_model.evaluate(sample))
        row[f"{mode}_ms"] = (time.perf_counter() - start) * 1e3 / n
        logits = np.concatenate([owner.decrypt(out) for out in outputs])
        row["errors"].append(np.abs(logits - reference).max())
    row["error"] = max(row.pop("errors"))
    return row


class SmallCNN(torch.nn.Module):
    """conv 3->8 3x3 stride 2 pad 1 -> square -> avgpool 2 -> fc -> 10 (issue 15's CIFAR-size model)."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = torch.nn.AvgPool2d(2)
        self.fc = torch.nn.Linear(8 * (side // 4) ** 2, 10)

    def forward(self, x):
        return self.fc(self.pool(he.nn.Square()(self.conv(x))).flatten(1))


#: Figures before the structural lowering (issue 15, same 2-core machine): compile s, peak GB, N,
#: single-sample ms. The MLP row's compile and memory were not measured then.
BEFORE = {
    "digits MLP 64-32-10": (None, None, 8192, 49.0),
    "small CNN 3x32x32": (10.0, 0.8, 8192, 3200.0),
    "small CNN 3x64x64": (161.0, 8.0, 32768, 76000.0),
}


def _peak_rss() -> int:
    """This process's peak resident memory: VmHWM, which exec resets (ru_maxrss keeps the parent's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _compile_in_fresh_process(payload: bytes, x: np.ndarray, queue) -> None:
    tracemalloc.start()  # numpy registers its buffers with tracemalloc: the compile's own peak
    start = time.perf_counter()
    he.compile(payload, x)
    elapsed = time.perf_counter() - start
    queue.put((elapsed, tracemalloc.get_traced_memory()[1], _peak_rss()))


def compiler_row(net: torch.nn.Module, x: np.ndarray) -> dict:
    """Compile time and peak memory in a fresh process, then single-sample time and error in this one."""
    proto = he.export(net, torch.as_tensor(x[:1]))
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    child = spawn.Process(target=_compile_in_fresh_process, args=(proto.SerializeToString(), x, queue))
    child.start()
    compile_s, peak, rss = queue.get()
    child.join()
    model = he.compile(proto, x)
    keys = he.Keyring(model, "single")
    enc = he.EncryptedBatch.from_bytes(keys.encrypt(x[:1]).to_bytes(), keys.public_context)
    model.evaluate(enc, keys.public_context)  # encodes and caches the diagonals once
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = model.evaluate(enc, keys.public_context)
        times.append(time.perf_counter() - start)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"input": x[:1]})[0]
    return {
        "compile_s": compile_s,
        "peak": peak,
        "rss": rss,
        "N": model.params.poly_modulus_degree,
        "single_ms": min(times) * 1e3,
        "keys": len(keys.public_context_bytes()),
        "error": float(np.abs(keys.decrypt(out) - reference).max()),
    }


def compiler_table(mlp: torch.nn.Module, digits_x: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    models = {"digits MLP 64-32-10": (mlp, digits_x[:64])}
    for side in (32, 64):
        models[f"small CNN 3x{side}x{side}"] = (
            SmallCNN(side).eval(),
            rng.uniform(0, 1, size=(16, 3, side, side)).astype(np.float32),
        )
    print(
        "| model | compile s | compile peak MB | process peak RSS MB | N | single ms | keys MB single | max err | "
        "before: compile s / peak GB / N / single ms | compile speedup | single speedup |"
    )
    print("|" + "---|" * 11)
    for name, (net, x) in models.items():
        row = compiler_row(net, x)
        old_compile, old_peak, old_n, old_ms = BEFORE[name]
        before = f"{old_compile or '-'} / {old_peak or '-'} / {old_n} / {old_ms:g}"
        ratio = f"{old_compile / row['compile_s']:.0f}x" if old_compile else "-"
        print(
            f"| {name} | {row['compile_s']:.2f} | {row['peak'] / 2**20:.0f} | {row['rss'] / 2**20:.0f} | "
            f"{row['N']} | {row['single_ms']:.1f} | {row['keys'] / 1e6:.1f} | {row['error']:.1e} | {before} | "
            f"{ratio} | {old_ms / row['single_ms']:.1f}x |",
            flush=True,
        )


def _linear_after_conv(net: TutorialCNN) -> np.ndarray:
    """fc1 after the optional average pool, as one (in, out) matrix on the packed conv channels."""
    side = net.conv_side
    eye = torch.eye(4 * side * side).reshape(-1, 4, side, side)
    with torch.no_grad():
        return (net.fc1(net.pool(eye).flatten(1)) - net.fc1.bias).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sealed-only", action="store_true", help="print the sealed table only")
    parser.add_argument("--compiler-only", action="store_true", help="print the compiler table only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = build_models()
    if args.compiler_only:
        compiler_table(*models["a"])
        return
    if not args.sealed_only:
        print(
            "| model | N | depth | single ms | single ms, 2 procs | batch1024 ms/sample | batch4096 ms/sample | "
            "ct KB/sample single | ct KB/sample batch | keys MB single | keys MB batch | max err | tutorial ms | "
            "tutorial ct KB | tutorial keys MB | tutorial err | speedup single | keys ratio single |"
        )
        print("|" + "---|" * 18)
        for name, (net, x) in models.items():
            row = ours(net, x, SINGLE_SAMPLES[name])
            base = baseline(net, x, BASELINE_SAMPLES)
            print(
                f"| ({name}) | {row['N']} | {row['depth']} | {row['single_ms']:.1f} | {row['single2_ms']:.1f} | "
                f"{row['batch1024_ms']:.3f} | {row['batch4096_ms']:.3f} | {row['single_ct'] / 1e3:.0f} | "
                f"{row['batch_ct'] / 1e3:.1f} | "
                f"{row['single_keys'] / 1e6:.1f} | {row['batch_keys'] / 1e6:.1f} | {row['error']:.1e} | "
                f"{base['single_ms']:.0f} | {base['single_ct'] / 1e3:.0f} | {base['keys'] / 1e6:.1f} | "
                f"{base['error']:.1e} | "
                f"{base['single_ms'] / row['single_ms']:.1f}x | {base['keys'] / row['single_keys']:.1f}x |",
                flush=True,
            )
        print()
    print(
        "| sealed model | ms/sample, plain x | ms/sample, encrypted x | max err | sealed weights MB | "
        "owner's public keys MB | saved directory MB | upload KB/encrypted sample | seal s |"
    )
    print("|" + "---|" * 9)
    for name, (net, x) in models.items():
        row = sealed(net, x, SINGLE_SAMPLES[name])
        print(
            f"| ({name}) | {row['plain_ms']:.1f} | {row['encrypted_ms']:.1f} | {row['error']:.1e} | "
            f"{row['weights'] / 1e6:.1f} | {row['keys'] / 1e6:.1f} | {row['artifact'] / 1e6:.1f} | "
            f"{row['upload'] / 1e3:.0f} | {row['seal_s']:.1f} |",
            flush=True,
        )
    if not args.sealed_only:
        print()
        compiler_table(*models["a"])


if __name__ == "__main__":
    main()
