"""The cost of serving: encrypted predict through ``mlflow models serve``, by worker count and concurrency.

For the digits MLP 64-32-10 (square activation) compiled to CKKS, and for both packing layouts
(``single``: one sample per request; ``batch``: ``--batch-size`` samples per request), it measures
over loopback, for each server setup in ``--workers`` (default: 1 worker, then one per core, the
``ScoringServer`` default; ``W/K`` sets uvicorn's keep-alive timeout to K seconds):

- server throughput (samples/s), mean and p95 latency at concurrency 1, 2, 4, 8 and 16: each client
  thread has its own connection and posts a request encrypted beforehand, so that the clients'
  encryption and decryption (on the clients' machines in a deployment) do not take the server's
  cores here; every answer is decrypted after the timing and checked against the plaintext model;
- how often a worker answered ``UNKNOWN_KEY_ID`` (the client then uploads its context again): each
  key is uploaded once before the timing, to whichever worker takes it;
- end to end at concurrency 1 (``EncryptedClient``: encrypt + JSON + HTTP + evaluate + decrypt)
  against the same work in-process, and the payload per sample;
- with ``--distinct-keys K``, resident memory of each worker while K clients, each with its own
  single-layout key, send one request each (the context caches' bounds), and the bytes of the
  workers' shared spill directory.

One thread per process (``torch.set_num_threads(1)``). Everything lives in a temporary MLflow store.

Run::

    python benchmarks/serving.py --workers 1,2,2/0 --distinct-keys 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import requests
import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_privacy import he
from lightning_privacy.he.parallel import available_workers
from lightning_privacy.mlflow_plugins import EncryptedClient, ScoringServer, ckks, protocol
from lightning_privacy.mlflow_plugins.context_spill import SPILL_DIR_ENV
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest, ErrorCode

CONCURRENCY = (1, 2, 4, 8, 16)
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
KEEP_ALIVE_ENV = "UVICORN_TIMEOUT_KEEP_ALIVE"
MIB = 2**20


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


class PreparedRequest:
    """One encrypted request as JSON bodies with and without the public context."""

    def __init__(self, compiled: he.CompiledModel, layout: str, x: np.ndarray) -> None:
        self.keyring = he.Keyring(compiled, layout)
        context = self.keyring.public_context_bytes()
        row = EncryptedRequest(protocol.key_id_of(context), layout, context, self.keyring.encrypt(x).to_bytes())
        self.with_context = json.dumps(protocol.encode_request([row]))
        self.without_context = json.dumps(protocol.encode_request([EncryptedRequest(**{**vars(row), "context": None})]))
        self.expected = compiled.plaintext_forward(x)

    def post(self, session: requests.Session, url: str) -> tuple[bytes, int]:
        """The answer's ciphertext and how many ``UNKNOWN_KEY_ID`` answers came before it (0 or 1)."""
        unknown = 0
        for body in (self.without_context, self.with_context):
            try:
                response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=600)
            except requests.ConnectionError:  # a connection the server closed as it was reused: once more
                response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=600)
            if response.status_code == 200:
                (result,) = protocol.decode_response(response.json())
                return result, unknown
            if (
                response.status_code != 400
                or response.json().get(protocol.ERROR_CODE_FIELD) != ErrorCode.UNKNOWN_KEY_ID
            ):
                raise RuntimeError(f"The server answered {response.status_code}: {response.text[:500]}")
            unknown += 1
        raise RuntimeError("The server answered UNKNOWN_KEY_ID to a request that carried the context.")

    def error(self, result: bytes) -> float:
        logits = self.keyring.decrypt(he.EncryptedBatch.from_bytes(result, self.keyring.public_context))
        return float(np.abs(logits - self.expected).max())


def throughput(request: PreparedRequest, url: str, concurrency: int, n_requests: int) -> dict[str, float]:
    """``n_requests`` posts of ``request`` by ``concurrency`` threads, one connection each."""
    local = threading.local()
    latencies: list[float] = []
    results: list[bytes] = []
    unknown = 0
    lock = threading.Lock()

    def one(_: int) -> None:
        nonlocal unknown
        if not hasattr(local, "session"):
            local.session = requests.Session()
        start = time.perf_counter()
        result, refused = request.post(local.session, url)
        with lock:
            latencies.append(time.perf_counter() - start)
            results.append(result)
            unknown += refused

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - start
    return {
        "throughput": n_requests / wall,
        "latency": statistics.mean(latencies),
        "p95": float(np.percentile(latencies, 95)),
        "unknown": unknown,
        "error": max(request.error(r) for r in results[:4]),
    }


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def distinct_keys(
    server: ScoringServer, compiled: he.CompiledModel, x: np.ndarray, n_keys: int, spill_dir: Path
) -> list[tuple[int, list[int], int]]:
    """(keys so far, RSS of each worker, spill bytes) while ``n_keys`` single-layout clients send one request each."""
    points = [(0, [rss_bytes(pid) for pid in server.worker_pids()], _dir_bytes(spill_dir))]
    lock = threading.Lock()
    done = 0

    def one(_: int) -> None:
        nonlocal done
        request = PreparedRequest(compiled, "single", x)
        with requests.Session() as session:
            result, _ = request.post(session, f"{server.url}/invocations")
        assert request.error(result) < 1e-2
        with lock:
            done += 1

    step = max(1, n_keys // 4)
    with ThreadPoolExecutor(4) as pool:
        for start in range(0, n_keys, step):
            list(pool.map(one, range(start, min(n_keys, start + step))))
            points.append((done, [rss_bytes(pid) for pid in server.worker_pids()], _dir_bytes(spill_dir)))
    return points


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512, help="samples per batch-layout request")
    parser.add_argument(
        "--workers",
        default=f"1,{available_workers()}",
        help="comma-separated server setups to compare: W uvicorn workers, or W/K with uvicorn's keep-alive timeout "
        "K seconds (UVICORN_TIMEOUT_KEEP_ALIVE; default 5); 1 is the server before this benchmark's change",
    )
    parser.add_argument("--rounds", type=int, default=2, help="requests per client thread (bounded loop)")
    parser.add_argument("--min-requests", type=int, default=8, help="fewest requests per point (for p95)")
    parser.add_argument("--distinct-keys", type=int, default=0, help="clients with their own key (last server)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setups = args.workers.split(",")

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    model = train_digits_mlp(x, y)
    compiled = he.compile(he.export(model, torch.from_numpy(x[:1])), x)
    load_before = os.getloadavg()

    rows, end_to_end, memory = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ.update(MLFLOW_TRACKING_URI=store, MLFLOW_REGISTRY_URI=store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        mlflow.set_experiment("serving-benchmark")
        with mlflow.start_run():
            info = ckks.log_model(compiled, name="model", registered_model_name="bench-ckks")
        uri = f"models:/bench-ckks/{info.registered_model_version}"

        for w, setup in enumerate(setups):
            workers, _, keep_alive = setup.partition("/")
            workers = int(workers)
            spill_dir = Path(tmp) / f"spill-{w}"
            # MLflow answers 504 after 60 s, counted from arrival: c16 batch requests queue longer on a busy machine.
            env = {SPILL_DIR_ENV: str(spill_dir), TIMEOUT_ENV: "600"}
            if keep_alive:
                env[KEEP_ALIVE_ENV] = keep_alive
            log = Path(tmp) / f"server-{w}.log"
            with ScoringServer(uri, workers=workers, env=env, log_path=log) as server:
                url = f"{server.url}/invocations"
                for layout, per_request in (("single", 1), ("batch", args.batch_size)):
                    request = PreparedRequest(compiled, layout, x[:per_request])
                    with requests.Session() as session:
                        request.post(session, url)  # the one upload of this key
                    throughput(request, url, 2 * workers, 2 * workers)  # untimed: every worker reads the context
                    for concurrency in CONCURRENCY:
                        n = max(concurrency * args.rounds, args.min_requests)
                        stats = throughput(request, url, concurrency, n)
                        rows.append((setup, layout, per_request, concurrency, n, stats))
                        print(f"{setup} {layout} c{concurrency}: {stats}", flush=True)
                    if w == 0:
                        end_to_end.append(
                            (layout, per_request, *_end_to_end(compiled, server.url, layout, x[:per_request]))
                        )
                if args.distinct_keys and w == len(setups) - 1:
                    memory = distinct_keys(server, compiled, x[:1], args.distinct_keys, spill_dir)
    load_after = os.getloadavg()

    _print_throughput(rows, compiled, load_before, load_after)
    _print_end_to_end(end_to_end, setups[0])
    if memory:
        _print_memory(memory, setups[-1])


def _end_to_end(compiled: he.CompiledModel, url: str, layout: str, x: np.ndarray) -> tuple[float, float, float, float]:
    """Served latency with ``EncryptedClient`` at concurrency 1, in-process time, KB up and down per sample."""
    client = EncryptedClient(compiled, url=url, layout=layout)
    client.predict_logits(x)  # keys and the upload
    sent, received, latencies = client.bytes_sent, client.bytes_received, []
    for _ in range(3):
        start = time.perf_counter()
        client.predict_logits(x)
        latencies.append(time.perf_counter() - start)
    samples = 3 * len(x)
    up, down = (client.bytes_sent - sent) / samples / 1024, (client.bytes_received - received) / samples / 1024
    return statistics.mean(latencies), in_process_seconds(compiled, layout, x, repeats=3), up, down


def _print_throughput(rows: list, compiled: he.CompiledModel, load_before: tuple, load_after: tuple) -> None:
    header = (
        f"{'workers':>7} {'layout':<6} {'n/req':>5} {'conc':>4} {'reqs':>4} {'samples/s':>9} {'x conc 1':>8} "
        f"{'latency ms':>10} {'p95 ms':>8} {'UNKNOWN_KEY_ID':>14} {'max err':>8}"
    )
    print(
        f"\nEncrypted serving, digits MLP 64-32-10, N={compiled.params.poly_modulus_degree}, loopback, "
        f"{available_workers()} cores; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
        f"\n{header}\n{'-' * len(header)}"
    )
    base = {}
    for setup, layout, per_request, concurrency, n, s in rows:
        samples = s["throughput"] * per_request
        base.setdefault((setup, layout), samples)
        print(
            f"{setup:>7} {layout:<6} {per_request:>5d} {concurrency:>4d} {n:>4d} {samples:>9.1f} "
            f"{samples / base[(setup, layout)]:>8.2f} {1e3 * s['latency']:>10.1f} {1e3 * s['p95']:>8.1f} "
            f"{s['unknown']:>14d} {s['error']:>8.1e}"
        )
    print(
        "x conc 1: throughput / the same server's throughput at concurrency 1. Requests are encrypted before the\n"
        "timing and decrypted after it (checked: max err is the largest |logit| deviation from the plaintext model).\n"
        "UNKNOWN_KEY_ID: answers that made the client upload its context again (each key was uploaded once before)."
    )


def _print_end_to_end(rows: list, setup: str) -> None:
    header = (
        f"{'layout':<6} {'n/req':>5} {'served ms':>9} {'in-proc ms':>10} {'x':>5} {'KB up/sample':>12} "
        f"{'KB down/sample':>14}"
    )
    print(f"\nEnd to end with EncryptedClient, concurrency 1, server {setup}\n{header}\n{'-' * len(header)}")
    for layout, per_request, served, local, up, down in rows:
        print(
            f"{layout:<6} {per_request:>5d} {1e3 * served:>9.1f} {1e3 * local:>10.1f} {served / local:>5.2f} "
            f"{up:>12.2f} {down:>14.2f}"
        )


def _print_memory(points: list, setup: str) -> None:
    print(f"\nResident memory (MiB) of each worker of server {setup} while clients with distinct keys send a request")
    for keys, rss, spill in points:
        print(
            f"{keys:>5d} keys: " + " ".join(f"{r / MIB:>8.0f}" for r in rss) + f"   spill dir {spill / MIB:>6.0f} MiB"
        )


if __name__ == "__main__":
    main()
