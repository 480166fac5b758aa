"""Benchmarks, load and soak tests; each script runs as a module from the repository root:
``python -m loadtests.<script> --help``. Shared pieces (tiny models and adapters, a server process, the PEFT
reference, timing, doc sections) live in ``loadtests.common``; tests may import them, loadtests never import tests.
"""
