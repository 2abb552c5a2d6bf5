"""What a served model needs imports without torch, ONNX or Lightning (issue 10, item 13; he part).

A fresh interpreter blocks those packages with a ``sys.meta_path`` finder, imports the modules the
server and the client use, loads a saved model and runs one encrypted round trip; the parent
compares the decrypted logits with onnxruntime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tests.he.helpers import digits, ort_run

#: The checkout under test (tests chdir into temporary directories).
REPO_ROOT = str(Path(__file__).resolve().parents[2])
BLOCKED = ("torch", "onnx", "onnxruntime", "pytorch_lightning", "lightning", "opacus")

_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    import numpy as np

    BLOCKED = set(sys.argv[3].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    from lightning_privacy.he.ciphertexts import EncryptedBatch
    from lightning_privacy.he.context import PublicContext
    from lightning_privacy.he.keys import Keyring
    from lightning_privacy.he.model import CompiledModel
    from lightning_privacy.he import evaluation, serialization  # noqa: F401

    model = CompiledModel.load(sys.argv[1])
    x = np.load(sys.argv[2])
    out = {}
    for layout in ("batch", "single"):
        keys = Keyring(model, layout)
        server = PublicContext.from_bytes(keys.public_context_bytes())
        model.check_context(server)
        request = EncryptedBatch.from_bytes(keys.encrypt(x).to_bytes(), server)
        reply = model.evaluate(request, server).to_bytes()
        out[layout] = keys.decrypt(EncryptedBatch.from_bytes(reply, keys.public_context)).tolist()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"logits": out, "leaked": leaked}))
    """
)


def test_load_and_evaluate_without_torch_onnx_or_lightning(mlp, tmp_path):
    proto, model = mlp
    x = digits(3)
    model.save(tmp_path / "model")
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "model"), str(tmp_path / "x.npy"), ",".join(BLOCKED)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["leaked"] == []
    for layout in ("batch", "single"):
        np.testing.assert_allclose(np.array(answer["logits"][layout]), ort_run(proto, x), atol=1e-3)
