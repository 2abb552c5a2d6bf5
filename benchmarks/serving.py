"""The cost of serving: encrypted predict through ``mlflow models serve``, by worker count and concurrency.

For the digits MLP 64-32-10 (square activation) compiled to CKKS, and for both packing layouts
(``single``: one sample per request; ``batch``: ``--batch-size`` samples per request), it measures
over loopback, for each server setup in ``--workers`` (default: 1 worker, then one per core, the
``ScoringServer`` default; ``W:keep-alive`` keeps connections open as uvicorn does by default,
instead of the ``Connection: close`` that ``ScoringServer`` sets for several workers; ``W:greedy``
turns off the accept gate, so that a busy worker still accepts new connections):

- server throughput (samples/s), mean and p95 latency at concurrency 1, 2, 4, 8 and 16 (``--concurrency``): each client
  thread has its own connection and posts a request encrypted beforehand, so that the clients'
  encryption and decryption (on the clients' machines in a deployment) do not take the server's
  cores here; every answer is decrypted after the timing and checked against the plaintext model.
  All servers run side by side and the points are interleaved (for each repeat, layout and
  concurrency, every setup in turn), so that a change of load on a shared machine hits every setup
  alike; throughput is the median over ``--repeats``, ``x c1`` the median of each repeat's ratio to
  concurrency 1 of the same setup, latencies are pooled over the repeats;
- each worker's CPU time during a point divided by its wall time (``busy``: how evenly the requests
  spread over the workers; under 1 on an idle machine means the worker waited for work), and the
  server's CPU seconds per request;
- how often a worker answered ``UNKNOWN_KEY_ID`` (the client then uploads its context again): each
  key is uploaded once before the timing, to whichever worker takes it;
- the ceiling the hardware sets: P processes evaluating the same request at once in-process (no HTTP,
  no JSON), samples/s against one process;
- end to end at concurrency 1 (``EncryptedClient``: encrypt + JSON + HTTP + evaluate + decrypt)
  against the same work in-process, and the payload per sample;
- with ``--bursts R``, R times two batch requests posted at the same moment to each server of several
  workers: how often each worker took one (read from the workers' CPU time, so the machine's load
  does not decide it), against both queued on one worker while the other idled;
- with ``--distinct-keys K``, resident memory of each worker while K clients, each with its own
  single-layout key, send one request each (the context caches' bounds), and the bytes of the
  workers' shared spill directory.

The one-minute load average is printed before, during (lowest and highest at the points) and after:
on a 2-core machine shared with other work, throughput ratios mean little above a load of ~1.

One thread per process (``torch.set_num_threads(1)``). Everything lives in a temporary MLflow store.

Run::

    python benchmarks/serving.py                       # the table of README, ~8 min on 2 idle cores
    python benchmarks/serving.py --workers 1,2:greedy,2
    python benchmarks/serving.py --workers 2 --concurrency 1 --repeats 1 --distinct-keys 200  # memory
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
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
from lightning_privacy.mlflow_plugins._mlflow_fence import ACCEPT_WHEN_IDLE_ENV
from lightning_privacy.mlflow_plugins.context_spill import SPILL_DIR_ENV
from lightning_privacy.mlflow_plugins.protocol import EncryptedRequest, ErrorCode
from lightning_privacy.mlflow_plugins.serving import HEADERS_ENV

CONCURRENCY = (1, 2, 4, 8, 16)
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
KEEP_ALIVE = "keep-alive"
GREEDY = "greedy"
MIB = 2**20
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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
        self.context = self.keyring.public_context_bytes()
        self.ciphertext = self.keyring.encrypt(x).to_bytes()
        row = EncryptedRequest(protocol.key_id_of(self.context), layout, self.context, self.ciphertext)
        self.with_context = json.dumps(protocol.encode_request([row])).encode()
        self.without_context = json.dumps(
            protocol.encode_request([EncryptedRequest(**{**vars(row), "context": None})])
        ).encode()
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


@dataclass
class Point:
    """What one (setup, layout, concurrency) measured, over the repeats."""

    throughput: list[float] = field(default_factory=list)  # requests/s, one per repeat
    ratio: list[float] = field(default_factory=list)  # throughput / the same repeat's concurrency 1
    latencies: list[float] = field(default_factory=list)  # seconds, pooled
    busy: list[list[float]] = field(default_factory=list)  # per repeat: each worker's CPU s / wall s
    cpu_per_request: list[float] = field(default_factory=list)  # server CPU seconds, one per repeat
    unknown: int = 0
    error: float = 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def measure(
    request: PreparedRequest, url: str, pids: list[int], concurrency: int, n_requests: int, point: Point
) -> float:
    """``n_requests`` posts of ``request`` by ``concurrency`` threads, one connection each, into ``point``.

    Returns the throughput in requests/s.
    """
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

    cpu_before = [cpu_seconds(pid) for pid in pids]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - start
    cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
    point.throughput.append(n_requests / wall)
    point.latencies.extend(latencies)
    point.busy.append([c / wall for c in cpu])
    point.cpu_per_request.append(sum(cpu) / n_requests)
    point.unknown += unknown
    point.error = max(point.error, *(request.error(r) for r in results[:2]))
    return n_requests / wall


#: What the children of :func:`parallel_ceiling` evaluate, inherited through ``fork`` (SEAL objects do not pickle).
_CEILING_JOB: tuple[he.CompiledModel, PreparedRequest, int] | None = None


def _evaluate_repeatedly(_: int) -> float:
    """In a forked child: evaluations per second of ``_CEILING_JOB``'s request."""
    compiled, request, repeats = _CEILING_JOB
    context = he.PublicContext.from_bytes(request.context)
    batch = he.EncryptedBatch.from_bytes(request.ciphertext, context)
    compiled.evaluate(batch, context)  # warm: this process's tables and caches
    start = time.perf_counter()
    for _ in range(repeats):
        compiled.evaluate(batch, context)
    return repeats / (time.perf_counter() - start)


def parallel_ceiling(compiled: he.CompiledModel, request: PreparedRequest, processes: int, repeats: int) -> float:
    """Evaluations per second of ``processes`` processes evaluating ``request`` at once (no HTTP, no JSON)."""
    global _CEILING_JOB
    _CEILING_JOB = (compiled, request, repeats)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        return sum(pool.map(_evaluate_repeatedly, range(processes)))


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


def burst_split(request: PreparedRequest, url: str, pids: list[int]) -> bool:
    """Whether two requests posted at the same moment (each on a new connection) went to two workers.

    Read from the workers' CPU time: one worker spending over 3/4 of the two requests' CPU time
    evaluated both, one after the other, while another could have taken one. A count, not a timing:
    the load of the machine slows the requests but does not decide where they go.
    """
    barrier = threading.Barrier(2)

    def one(_: int) -> None:
        barrier.wait()
        with requests.Session() as session:
            request.post(session, url)

    before = [cpu_seconds(pid) for pid in pids]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(2)))
    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    return max(used) <= 0.75 * sum(used)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else 0


def _server_env(setup: str, spill_dir: Path) -> tuple[int, dict[str, str]]:
    """Workers and environment of a setup ``W`` or ``W:keep-alive``."""
    workers, *options = setup.split(":")
    if any(o not in (KEEP_ALIVE, GREEDY) for o in options):
        raise SystemExit(f"--workers: {setup!r} is not W with options among :{KEEP_ALIVE} :{GREEDY}")
    # MLflow answers 504 after 60 s, counted from arrival: c16 batch requests queue longer on a busy machine.
    env = {SPILL_DIR_ENV: str(spill_dir), TIMEOUT_ENV: "600"}
    if KEEP_ALIVE in options:
        env[HEADERS_ENV] = "connection:keep-alive"  # ScoringServer adds no connection:close then
    if GREEDY in options:
        env[ACCEPT_WHEN_IDLE_ENV] = "0"  # each worker accepts whatever it can, busy or not
    return int(workers), env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512, help="samples per batch-layout request")
    parser.add_argument(
        "--workers",
        default=f"1,{available_workers()}",
        help=f"comma-separated server setups to compare: W uvicorn workers (ScoringServer's defaults), with "
        f"options :{KEEP_ALIVE} (kept-alive connections, uvicorn's own default; the server before Connection: "
        f"close) and :{GREEDY} (every worker accepts whatever it can, busy or not: {ACCEPT_WHEN_IDLE_ENV}=0, "
        "the server before the accept gate)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved passes over all points (medians)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client thread and point (bounded loop)")
    parser.add_argument("--min-requests", type=int, default=8, help="fewest requests per point and repeat")
    parser.add_argument("--distinct-keys", type=int, default=0, help="clients with their own key (last server)")
    parser.add_argument(
        "--bursts",
        type=int,
        default=0,
        help="times two batch requests are posted at once to each server of several workers (where they go)",
    )
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="comma-separated numbers of concurrent clients (1 is always measured: the ratios' base)",
    )
    args = parser.parse_args()
    concurrencies = sorted({1, *(int(c) for c in args.concurrency.split(","))})
    torch.set_num_threads(1)
    setups = args.workers.split(",")

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    model = train_digits_mlp(x, y)
    compiled = he.compile(he.export(model, torch.from_numpy(x[:1])), x)
    layouts = (("single", 1), ("batch", args.batch_size))
    requests_by_layout = {layout: PreparedRequest(compiled, layout, x[:n]) for layout, n in layouts}
    loads = [os.getloadavg()[0]]

    points: dict[tuple[str, str, int], Point] = {}
    end_to_end, memory = [], []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ.update(MLFLOW_TRACKING_URI=store, MLFLOW_REGISTRY_URI=store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        mlflow.set_experiment("serving-benchmark")
        with mlflow.start_run():
            info = ckks.log_model(compiled, name="model", registered_model_name="bench-ckks")
        uri = f"models:/bench-ckks/{info.registered_model_version}"

        servers = {}
        for w, setup in enumerate(setups):
            workers, env = _server_env(setup, Path(tmp) / f"spill-{w}")
            server = ScoringServer(uri, workers=workers, env=env, log_path=Path(tmp) / f"server-{w}.log")
            servers[setup] = stack.enter_context(server)
            for layout, _ in layouts:
                request = requests_by_layout[layout]
                with requests.Session() as session:
                    request.post(session, f"{server.url}/invocations")  # the one upload of this key
                # Untimed: every worker reads the context from the spill directory.
                measure(request, f"{server.url}/invocations", [], 2 * workers, 2 * workers, Point())

        ceiling = {}
        for _ in range(args.repeats):
            for layout, _ in layouts:
                for processes in sorted({1, available_workers()}):
                    rate = parallel_ceiling(compiled, requests_by_layout[layout], processes, repeats=2)
                    ceiling.setdefault((layout, processes), []).append(rate)
                for concurrency in concurrencies:
                    n = max(concurrency * args.rounds, args.min_requests)
                    for setup, server in servers.items():
                        point = points.setdefault((setup, layout, concurrency), Point())
                        url, pids = f"{server.url}/invocations", server.worker_pids()
                        rate = measure(requests_by_layout[layout], url, pids, concurrency, n, point)
                        base = points[(setup, layout, 1)].throughput[-1]
                        point.ratio.append(rate / base)
                        loads.append(os.getloadavg()[0])
                        print(
                            f"{setup} {layout} c{concurrency}: {rate:.2f} req/s, x c1 {rate / base:.2f}, "
                            f"busy {' '.join(f'{b:.2f}' for b in point.busy[-1])}, load {loads[-1]:.1f}",
                            flush=True,
                        )

        bursts: dict[str, list[bool]] = {}
        for _ in range(args.bursts):  # interleaved: each round, every server of several workers in turn
            for setup, server in servers.items():
                if len(pids := server.worker_pids()) > 1:
                    split = burst_split(requests_by_layout["batch"], f"{server.url}/invocations", pids)
                    bursts.setdefault(setup, []).append(split)

        first = servers[setups[0]]
        for layout, n in layouts:
            end_to_end.append((layout, n, *_end_to_end(compiled, first.url, layout, x[:n])))
        if args.distinct_keys:
            w = len(setups) - 1
            memory = distinct_keys(servers[setups[w]], compiled, x[:1], args.distinct_keys, Path(tmp) / f"spill-{w}")
    loads.append(os.getloadavg()[0])

    _print_throughput(points, dict(layouts), compiled, loads, args.repeats)
    _print_summary(points, dict(layouts))
    _print_ceiling(ceiling, dict(layouts))
    _print_end_to_end(end_to_end, setups[0])
    if bursts:
        print(f"\nTwo batch requests posted at once, {args.bursts} times: how often they went to two workers")
        for setup, splits in bursts.items():
            print(f"{setup:>12}: {sum(splits)} of {len(splits)}")
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
    return statistics.median(latencies), in_process_seconds(compiled, layout, x, repeats=3), up, down


def _print_throughput(
    points: dict[tuple[str, str, int], Point],
    per_request: dict[str, int],
    compiled: he.CompiledModel,
    loads: list[float],
    repeats: int,
) -> None:
    header = (
        f"{'workers':>12} {'layout':<6} {'n/req':>5} {'conc':>4} {'reqs':>4} {'samples/s':>9} {'x c1':>5} "
        f"{'latency ms':>10} {'p95 ms':>8} {'worker busy':>11} {'cpu s/req':>9} {'UNKNOWN_KEY_ID':>14} {'max err':>8}"
    )
    during = loads[1:-1] or loads
    print(
        f"\nEncrypted serving, digits MLP 64-32-10, N={compiled.params.poly_modulus_degree}, loopback, "
        f"{available_workers()} cores, medians of {repeats} interleaved repeats; 1-min load average "
        f"{loads[0]:.2f} before, {min(during):.2f}-{max(during):.2f} during, {loads[-1]:.2f} after"
        f"\n{header}\n{'-' * len(header)}"
    )
    setups, layouts = list(dict.fromkeys(k[0] for k in points)), list(per_request)
    for (setup, layout, concurrency), p in sorted(
        points.items(), key=lambda item: (setups.index(item[0][0]), layouts.index(item[0][1]), item[0][2])
    ):
        n = per_request[layout]
        busy = " ".join(f"{statistics.median(b):.2f}" for b in zip(*p.busy, strict=True))
        print(
            f"{setup:>12} {layout:<6} {n:>5d} {concurrency:>4d} {len(p.latencies):>4d} "
            f"{n * statistics.median(p.throughput):>9.1f} {statistics.median(p.ratio):>5.2f} "
            f"{1e3 * statistics.mean(p.latencies):>10.1f} {1e3 * float(np.percentile(p.latencies, 95)):>8.1f} "
            f"{busy:>11} {statistics.median(p.cpu_per_request):>9.3f} {p.unknown:>14d} {p.error:>8.1e}"
        )
    print(
        "x c1: the median over repeats of throughput / the same server's throughput at concurrency 1 in that repeat.\n"
        "worker busy: each worker's CPU time / wall time (median over repeats); cpu s/req: the workers' CPU time\n"
        "per request.\n"
        "Requests are encrypted before the timing and decrypted after it (max err: largest |logit| deviation from the\n"
        "plaintext model). UNKNOWN_KEY_ID: answers that made a client upload its context again (each key was uploaded\n"
        "once before the timing)."
    )


def _print_summary(points: dict[tuple[str, str, int], Point], per_request: dict[str, int]) -> None:
    """The table of README: samples/s by concurrency, x c1 at 4, p95 latency at 1, 4 and 16 (those measured)."""
    levels = sorted({k[2] for k in points})
    ratio_at = 4 if 4 in levels else levels[-1]
    p95_at = [c for c in (1, 4, 16) if c in levels]
    print(
        f"\n| workers | layout | {' | '.join(f'c{c}' for c in levels)} | c{ratio_at}/c1 | "
        f"p95 ms {' / '.join(f'c{c}' for c in p95_at)} |"
    )
    print(f"|---|---|{'---|' * len(levels)}---|---|")
    for setup in dict.fromkeys(k[0] for k in points):
        for layout, n in per_request.items():
            row = [points[(setup, layout, c)] for c in levels]
            rates = " | ".join(f"{n * statistics.median(p.throughput):.1f}" for p in row)
            p95 = " / ".join(f"{1e3 * np.percentile(points[(setup, layout, c)].latencies, 95):.0f}" for c in p95_at)
            ratio = statistics.median(points[(setup, layout, ratio_at)].ratio)
            print(f"| {setup} | {layout} ({n}) | {rates} | {ratio:.2f} | {p95} |")


def _print_ceiling(ceiling: dict[tuple[str, int], list[float]], per_request: dict[str, int]) -> None:
    print("\nIn-process ceiling: P processes evaluating at once, no HTTP or JSON (median samples/s)")
    for (layout, processes), rates in ceiling.items():
        rate = statistics.median(rates) * per_request[layout]
        one = statistics.median(ceiling[(layout, 1)]) * per_request[layout]
        print(f"{layout:<6} P={processes}: {rate:>9.1f} samples/s  x P=1 {rate / one:>5.2f}")


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
