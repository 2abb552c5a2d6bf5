"""The one ``privacy.*`` tag schema, shared by the Lightning callback and the MLflow face."""

from __future__ import annotations

import subprocess
import sys

from lightning_privacy.privacy_tags import TAG_PREFIX, TRAINING_TAGS, privacy_only, privacy_tags


def test_tags_are_prefixed_strings_and_selected_back():
    values = {"epsilon": 2.97, "delta": 1e-05, "steps": 450, "accountant": "rdp"}
    tags = privacy_tags(values)
    expected = {
        "privacy.epsilon": "2.97",
        "privacy.delta": "1e-05",
        "privacy.steps": "450",
        "privacy.accountant": "rdp",
    }
    assert tags == expected
    assert privacy_only({**tags, "team": "fraud", "mlflow.user": "x", "privacyish": "no"}) == tags
    assert set(TRAINING_TAGS) >= set(values)


def test_both_faces_use_the_core_schema():
    from lightning_privacy.callbacks import mlflow_privacy

    assert mlflow_privacy.TAG_PREFIX is TAG_PREFIX


def test_the_schema_imports_without_torch_or_mlflow():
    code = "import sys, lightning_privacy.privacy_tags; print(sorted({'torch', 'mlflow', 'opacus'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
