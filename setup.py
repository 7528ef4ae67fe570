"""Packaging: the Python package, kernels/ as vljepa_fast._kernels and csrc/ as vljepa_fast._csrc.

The native libraries are not compiled here: they are built against the torch that runs them, on
first use or with ``python -m vljepa_fast.build`` (see vljepa_fast/_ext.py), so ``pip install``
never needs torch at build time and never mismatches it.
"""

from setuptools import setup

setup(
    packages=[
        "vljepa_fast",
        "vljepa_fast.ops",
        "vljepa_fast.integrations",
        "vljepa_fast.models",
        "vljepa_fast.eval",
        "vljepa_fast.train",
        "vljepa_fast._kernels",
        "vljepa_fast._csrc",
    ],
    package_dir={"vljepa_fast._kernels": "kernels", "vljepa_fast._csrc": "csrc"},
    package_data={"vljepa_fast._csrc": ["sources.txt", "*.cpp", "cpu/*", "cuda/*", "include/*"]},
)
