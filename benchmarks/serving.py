"""The cost of serving: encrypted predict through ``mlflow models serve`` vs the same model in-process.

For the digits MLP 64-32-10 (square activation) compiled to CKKS, and for both packing layouts
(``single``: one sample per request; ``batch``: ``--batch-size`` samples per request), it measures
over loopback, at concurrency 1, 4 and 16 with a bounded number of requests:

- end-to-end latency per request (client encrypt + JSON/base64 + HTTP + server evaluate + decrypt),
- throughput in samples per second,
- payload bytes per sample (request and response bodies; the public context is sent once, before),

and beside it the same work in-process (encrypt + evaluate + decrypt, no MLflow, no HTTP), so
the cost of serving shows as a ratio. One thread per process (``torch.set_num_threads(1)``); the
server runs ``--workers`` uvicorn processes. Everything lives in a temporary MLflow store.

Run::

    python benchmarks/serving.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_privacy import he
from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ckks

CONCURRENCY = (1, 4, 16)


def train_digits_mlp(x: np.ndarray, y: np.ndarray) -> nn.Module:
    """Plain (non-private) training: timings do not depend on how the weights were found."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), he.nn.Square(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def in_process_seconds(compiled: he.CompiledModel, layout: str, x: np.ndarray, repeats: int) -> float:
    """Mean seconds of encrypt + evaluate + decrypt for ``x`` in one process, keys made beforehand."""
    keyring = he.Keyring(compiled, layout)
    context = he.PublicContext.from_bytes(keyring.public_context_bytes())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keyring.decrypt(compiled.evaluate(keyring.encrypt(x), context))
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


def served(
    client: EncryptedClient, x: np.ndarray, expected: np.ndarray, concurrency: int, n_requests: int
) -> dict[str, float]:
    """Latencies and throughput of ``n_requests`` requests of ``x`` sent by ``concurrency`` threads,
    and the largest deviation of any answer from ``expected`` (concurrency must not corrupt results)."""

    def one(_: int) -> tuple[float, float]:
        start = time.perf_counter()
        logits = client.predict_logits(x)
        return time.perf_counter() - start, float(np.abs(logits - expected).max())

    sent, received = client.bytes_sent, client.bytes_received
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies, errors = zip(*pool.map(one, range(n_requests)))
    wall = time.perf_counter() - start
    samples = n_requests * len(x)
    return {
        "latency": statistics.mean(latencies),
        "p95": float(np.percentile(latencies, 95)),
        "throughput": samples / wall,
        "sent": (client.bytes_sent - sent) / samples,
        "received": (client.bytes_received - received) / samples,
        "error": max(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512, help="samples per batch-layout request")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the server")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client thread (bounded loop)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    model = train_digits_mlp(x, y)
    compiled = he.compile(he.export(model, torch.from_numpy(x[:1])), x)

    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ.update(MLFLOW_TRACKING_URI=store, MLFLOW_REGISTRY_URI=store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        mlflow.set_experiment("serving-benchmark")
        with mlflow.start_run():
            info = ckks.log_model(compiled, name="model", registered_model_name="bench-ckks")
        uri = f"models:/bench-ckks/{info.registered_model_version}"

        rows = []
        with ScoringServer(uri, workers=args.workers, log_path=Path(tmp) / "server.log") as server:
            for layout, per_request in (("single", 1), ("batch", args.batch_size)):
                batch = x[:per_request]
                local = in_process_seconds(compiled, layout, batch, repeats=3)
                expected = compiled.plaintext_forward(batch)
                client = EncryptedClient(compiled, url=server.url, layout=layout)
                for _ in range(args.workers):  # keys, and the one-time context upload to each worker
                    client.predict_logits(batch)
                for concurrency in CONCURRENCY:
                    stats = served(client, batch, expected, concurrency, concurrency * args.rounds)
                    rows.append((layout, per_request, concurrency, concurrency * args.rounds, local, stats))

    header = (
        f"{'layout':<6} {'n/req':>5} {'conc':>4} {'reqs':>4} {'latency ms':>10} {'p95 ms':>8} {'samples/s':>9} "
        f"{'in-proc ms':>10} {'in-proc samples/s':>17} {'latency x':>9} {'throughput /':>12} "
        f"{'KB up/sample':>12} {'KB down/sample':>14} {'max err':>8}"
    )
    print(f"\nEncrypted serving, digits MLP 64-32-10, N={compiled.params.poly_modulus_degree}, "
          f"{args.workers} server worker(s), loopback\n{header}\n{'-' * len(header)}")  # fmt: skip
    for layout, per_request, concurrency, n, local, s in rows:
        local_throughput = per_request / local
        print(
            f"{layout:<6} {per_request:>5d} {concurrency:>4d} {n:>4d} {1e3 * s['latency']:>10.1f} "
            f"{1e3 * s['p95']:>8.1f} {s['throughput']:>9.1f} {1e3 * local:>10.1f} {local_throughput:>17.1f} "
            f"{s['latency'] / local:>9.2f} {local_throughput / s['throughput']:>12.2f} "
            f"{s['sent'] / 1024:>12.2f} {s['received'] / 1024:>14.2f} {s['error']:>8.1e}"
        )
    print(
        "latency x = served latency / in-process time (encrypt + evaluate + decrypt, one thread) of the same request;\n"
        "throughput / = in-process samples/s / served samples/s. Bytes: JSON bodies (base64 ciphertexts); the\n"
        "public context is uploaded once per server worker before timing. max err: largest |logit| deviation of any\n"
        "served answer from the compiled model's plaintext forward pass."
    )


if __name__ == "__main__":
    main()
