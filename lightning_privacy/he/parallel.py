"""Process parallelism for sealapi kernels.

``tenseal.sealapi`` holds the GIL for the whole of every call, and TenSEAL's own thread pool only
drives its high-level tensors, so the kernels here use ``fork``: each child inherits the input
ciphertexts copy-on-write, computes its share of the outputs and hands them back through files in a
private temporary directory. Without ``fork`` (or with one worker) everything runs in-process.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import tenseal.sealapi as seal

from lightning_privacy.he.wire import TEMP_DIR


def available_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def map_ciphertexts(
    compute: Callable[[Sequence[int]], list[seal.Ciphertext]],
    items: Sequence[int],
    context: seal.SEALContext,
    workers: int,
) -> list[seal.Ciphertext]:
    """``compute(items)`` split over ``workers`` processes; results in the order of ``items``.

    A child that fails is recomputed in-process, so a crash there never loses the request.
    """
    workers = min(workers, len(items))
    if workers <= 1 or not hasattr(os, "fork"):
        return compute(items)
    chunks = [list(c) for c in np.array_split(np.asarray(items), workers)]
    with tempfile.TemporaryDirectory(dir=TEMP_DIR) as tmp:
        children = []
        for w, chunk in enumerate(chunks[1:], start=1):
            pid = os.fork()
            if pid == 0:  # child: compute, save, leave without running the parent's exit handlers
                status = 1
                try:
                    for j, ct in enumerate(compute(chunk)):
                        ct.save(os.path.join(tmp, f"{w}_{j}"))
                    status = 0
                finally:
                    os._exit(status)
            children.append((pid, w, chunk))
        results = compute(chunks[0])
        for pid, w, chunk in children:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                results.extend(compute(chunk))
                continue
            for j in range(len(chunk)):
                ct = seal.Ciphertext()
                ct.load(context, os.path.join(tmp, f"{w}_{j}"))
                results.append(ct)
    return results
