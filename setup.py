"""Package discovery for setuptools; everything else is in pyproject.toml.

``lightning_privacy/`` is installed as is; the faces ``callbacks/`` and ``mlflow_plugins/`` are
installed inside it, as ``lightning_privacy.callbacks`` and ``lightning_privacy.mlflow_plugins``.
Every folder with an ``__init__.py`` under these three is a package of the wheel, so a new
sub-package needs no edit here.
"""

from setuptools import find_packages, setup

#: Source folder -> the package it is installed as.
PACKAGE_DIR = {
    "lightning_privacy": "lightning_privacy",
    "lightning_privacy.callbacks": "callbacks",
    "lightning_privacy.mlflow_plugins": "mlflow_plugins",
}

setup(
    package_dir=PACKAGE_DIR,
    packages=[
        package
        for root, folder in PACKAGE_DIR.items()
        for package in (root, *(f"{root}.{sub}" for sub in find_packages(folder)))
    ],
)
