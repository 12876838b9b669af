"""Build script: packages vitattn with kernels/ shipped as vitattn.kernels.

The compiled extension vitattn._C (csrc/) is added here when it can be built.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["vitattn", "vitattn.*"]) + ["vitattn.kernels"],
    package_dir={"vitattn.kernels": "kernels"},
)
