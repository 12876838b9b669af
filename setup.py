"""Build script: packages vitattn with kernels/ shipped as vitattn.kernels.

The compiled extension vitattn._C (csrc/) is added here when it can be built.
"""

from setuptools import setup

setup(
    packages=[
        "vitattn",
        "vitattn.reference",
        "vitattn.torch_backend",
        "vitattn.kernels",
    ],
    package_dir={"vitattn.kernels": "kernels"},
)
