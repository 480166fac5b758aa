"""Test-only helpers shared by several test files (never imported outside ``tests/``)."""
