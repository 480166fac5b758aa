"""The default server of the end-to-end tests: the tiny Llama, 2 slots, batch 4, no keys. A test module that needs
other settings defines its own ``server`` fixture, which takes precedence over this one."""

import pytest

from loadtests.common.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("server")
    proc = ServerProcess(tiny_model_dir("llama"), data / "store", "--gpu-slots", "2", "--max-seq-len", "256",
                         "--max-batch-size", "4", "--startup-adapters", str(data / "none"))  # fmt: skip
    with proc:
        yield proc
