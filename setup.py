"""Build script: the package itself is declared in pyproject.toml; this file only adds the
optional C++/CUDA extension (see csrc/)."""

from setuptools import setup

setup()
