"""The wheel of lightning-privacy that a logged CKKS model carries, so it can be served from the model alone.

No package index has this project, and a wheel from ``pip wheel .`` would pull torch, Lightning and
Opacus into the serving environment. This one holds the installed package's source as it is
imported here (an editable checkout or a regular install alike) and declares only what serving
needs. Its version carries a local label, the hash of its content (``0.1.0+3f2a...``): no package
index can hold such a version, so a ``lightning-privacy==0.1.0`` found on an index never replaces
it, and two models with different code never share an installer's cache entry.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning_privacy

#: The import packages of the distribution; the faces live in their own source folders when the
#: package is installed in editable mode.
_PACKAGES = ("lightning_privacy", "lightning_privacy.callbacks", "lightning_privacy.mlflow_plugins")
#: Zip entries carry this date so the same source gives the same bytes (and the same model hash).
_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_wheel(directory: str | os.PathLike[str], requirements: Sequence[str]) -> Path:
    """Write the wheel into ``directory`` (created if needed) and return its path.

    Args:
        directory: where to write :func:`wheel_name`.
        requirements: its ``Requires-Dist`` entries (PEP 508 strings): what serving imports.

    Raises:
        ImportError: the source of a package of the distribution cannot be found.
    """
    files = {arcname: path.read_bytes() for arcname, path in sorted(_package_files())}
    content = hashlib.sha256()
    for name, data in files.items():
        content.update(f"{name}\0{len(data)}\0".encode() + data)
    version = f"{lightning_privacy.__version__}+{content.hexdigest()[:12]}"
    dist_info = f"lightning_privacy-{version}.dist-info"
    files[f"{dist_info}/METADATA"] = "\n".join(
        [
            "Metadata-Version: 2.1",
            "Name: lightning-privacy",
            f"Version: {version}",
            "Summary: lightning-privacy, as a CKKS model served by MLflow needs it",
            *(f"Requires-Dist: {r}" for r in requirements),
            "",
        ]
    ).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: lightning_privacy.mlflow_plugins\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,", ""]).encode()

    path = Path(directory) / f"lightning_privacy-{version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            wheel.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def _package_files() -> Iterator[tuple[str, Path]]:
    """(path inside the wheel, source file) of every module of every package, each once."""
    seen = set()
    for package in _PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"cannot find the source of {package} to bundle it with the model", name=package)
        root = Path(next(iter(spec.submodule_search_locations)))
        prefix = package.replace(".", "/")
        for file in root.rglob("*.py"):
            relative = file.relative_to(root)
            # Only folders that are packages, as setup.py's find_packages has it.
            if all((root / parent / "__init__.py").is_file() for parent in relative.parents):
                arcname = f"{prefix}/{relative.as_posix()}"
                if arcname not in seen:
                    seen.add(arcname)
                    yield arcname, file


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
