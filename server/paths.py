"""Where the server keeps what it derives once per machine (the converted embedded model, built kernels)."""

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$LORA_SERVER_CACHE_DIR``, else ``$XDG_CACHE_HOME/lora-server``, else ``~/.cache/lora-server``."""
    if env := os.environ.get("LORA_SERVER_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lora-server"
