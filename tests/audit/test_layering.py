"""``lightning_privacy.audit`` is a core: importing it loads no Lightning and no MLflow."""

from __future__ import annotations

import subprocess
import sys


def test_audit_core_imports_no_face_framework():
    code = (
        "import sys, lightning_privacy.audit; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', 'mlflow') "
        "or m.startswith(('lightning_privacy.callbacks', 'lightning_privacy.mlflow_plugins', "
        "'lightning_privacy.he'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
