"""Paths the tests read or run from, independent of how deep the test file sits under ``tests/``."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
