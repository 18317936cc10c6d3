"""Shim for Beam's `--setup_file ./setup.py` (Dataflow workers install the project from it); the
metadata lives in pyproject.toml."""
from setuptools import setup

setup()
