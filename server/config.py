"""Server settings: command-line flags and ``LORA_SERVER_<NAME>`` environment variables, validated once at startup.

Precedence: flag > environment variable > default. Every flag of ``lora-server serve`` is a field here.
"""

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.adapters.object_store import parse_store_url

# The library each --quantize method stores the base weights with (server/model/quantize.py).
QUANTIZE_LIBRARIES = {"int8": "torchao", "nf4": "bitsandbytes"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LORA_SERVER_",
        cli_kebab_case=True,
        cli_prog_name="lora-server serve",
        cli_implicit_flags=True,
        cli_exit_on_error=False,  # parser errors are raised for the CLI to tell without the values (keys!) they quote
        extra="ignore",
    )

    base_model: Path | None = Field(None, description="local Hugging Face folder; default: embedded SmolLM2-135M")
    data_dir: Path = Field(Path("data"), description="where uploaded adapters and the registry index are stored")
    adapter_store: str | None = Field(
        None,
        description="s3://bucket[/prefix]: keep adapter files in this S3-compatible bucket, shared by every node, "
        "data_dir then holding this node's copies; credentials from boto3's chain (AWS_* variables, AWS_PROFILE, "
        "an IAM role), never a flag",
    )
    s3_endpoint_url: str | None = Field(
        None, description="endpoint of an S3-compatible server (MinIO, R2, moto...) for adapter_store; default: AWS"
    )
    adapter_disk_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="with adapter_store: bytes of adapter copies this node keeps in data_dir/cache, the least recently "
        "used removed first; default: unbounded",
    )
    registry_db: Path | None = Field(
        None,
        description="with adapter_store: the registry's SQLite file, shareable by the nodes of one store on a "
        "filesystem with POSIX locks; default data_dir/registry.db",
    )
    startup_adapters: Path | None = Field(
        Path("adapters"), description="folder whose PEFT subfolders are registered at boot (skipped if missing)"
    )
    lora_load_dir: Path | None = Field(
        None,
        description="folder under which POST /v1/load_lora_adapter (vLLM's dynamic loading) may read PEFT folders; "
        "unset: that endpoint is disabled",
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=1, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="compute dtype; auto: bfloat16 on CUDA and on CPUs with avx512_bf16 or amx_bf16, else float32 "
        "(logged at startup, reported by /ready)",
    )
    quantize: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="store the base model's decoder linears quantized, adapters applied unmerged in dtype on top: "
        "int8 (torchao, weight-only, one scale per row) or nf4 (bitsandbytes, QLoRA's 4-bit format)",
    )
    gpu_slots: int = Field(
        128, ge=1, le=4096, description="adapters resident on the accelerator at once, at most (adapter_cache_bytes)"
    )
    adapter_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="bytes of adapter weights resident on the accelerator, each adapter at its own rank; "
        "default: room for 16 adapters of max_rank",
    )
    cpu_slots: int = Field(64, ge=0, le=100_000, description="host copies of adapters kept behind the slots")
    max_rank: int = Field(64, ge=1, le=1024, description="largest LoRA rank accepted")
    max_batch_size: int = Field(
        256, ge=1, le=4096, description="sequences running at once, at most (memory comes from the KV block pool)"
    )
    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="bytes of the paged KV cache; default: 2 GiB on CPU (at most what max_batch_size sequences of "
        "max_seq_len need), 80% of the free memory on CUDA",
    )
    kv_block_size: int = Field(16, ge=1, le=1024, description="positions per KV cache block")
    prefix_caching: bool = Field(
        True, description="reuse the cached KV blocks of a prompt's longest cached prefix (per adapter)"
    )
    max_seq_len: int = Field(2048, ge=16, le=1_000_000, description="prompt + generated tokens of one request")
    max_tokens_per_step: int = Field(2048, ge=1, description="token budget of one engine step")
    max_queue: int = Field(256, ge=1, description="waiting requests before new ones get 429")
    adapter_affinity: bool = Field(
        True, description="admit waiting requests whose adapter is already running first (bounded by 32 steps)"
    )
    lora_op: Literal["auto", "native", "grouped", "reference", "triton", "triton_sgmv", "triton_bgmv"] = Field(
        "auto",
        description="LoRA kernel: auto = the C kernel on CPU float32 (where it builds), else grouped (also on CUDA, "
        "until the Triton ops, selectable by name, have passed their tests on a GPU)",
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=4096, description="threads of the model's CPU math; default: one per core (torch's choice)"
    )
    packed_weights: bool = Field(
        True, description="CPU: pack the frozen base weights into oneDNN's layout at startup (faster GEMMs)"
    )
    merge_dominant: bool = Field(
        False,
        description="fold an adapter that holds most running rows into the base weights, the other rows served with a "
        "low-rank correction, unfolded when the mix changes (dLoRA); keeps the adapted weights aside while merged",
    )
    max_prompt_tokens: int | None = Field(None, ge=1, description="per-request prompt limit; default max_seq_len - 1")
    max_new_tokens: int | None = Field(None, ge=1, description="per-request generation limit; default max_seq_len - 1")
    request_timeout: float | None = Field(
        600.0, gt=0, description="seconds from arrival to the last token; a request past it ends (504 or 'timeout')"
    )
    max_upload_bytes: int = Field(512 * 2**20, ge=1024, description="largest adapter upload body")
    max_request_bytes: int = Field(4 * 2**20, ge=1024, description="largest body of any other request")
    drain_timeout: int = Field(30, ge=0, description="on SIGTERM, seconds running requests get to finish")
    metrics_adapter_labels: int = Field(100, ge=1, description="distinct adapter label values in metrics")
    api_key: SecretStr | None = Field(None, description="key for inference endpoints (Bearer token)")
    admin_key: SecretStr | None = Field(None, description="key for adapter upload and delete")
    health_requires_key: bool = Field(False, description="/health and /ready need the API key too")
    metrics_requires_key: bool = Field(False, description="/metrics needs the API key too")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_key", "admin_key")
    @classmethod
    def _sendable_key(cls, key: SecretStr | None) -> SecretStr | None:
        """A key no client can present would lock endpoints for good: refuse it at startup (without echoing it)."""
        if key is None:
            return None
        value = key.get_secret_value()
        if not value:
            raise ValueError("the key is empty, which no client can present; leave the setting out to run without one")
        if not all("!" <= c <= "~" for c in value):
            raise ValueError("a key must be printable ASCII without spaces: clients send it in an HTTP header "
                             "(Authorization: Bearer <key>)")  # fmt: skip
        return key

    @field_validator("quantize")
    @classmethod
    def _quantize_library(cls, method: str) -> str:
        """Refused at startup rather than after the tokenizer and registry are up (the import is only checked)."""
        library = QUANTIZE_LIBRARIES.get(method)
        if library is not None and importlib.util.find_spec(library) is None:
            raise ValueError(f"quantize={method} needs the {library} package, which is not installed")
        return method

    @field_validator("lora_load_dir")
    @classmethod
    def _existing_dir(cls, path: Path | None) -> Path | None:
        """A folder that is not there would make every load fail later, with a reason the client cannot fix."""
        if path is not None and not path.is_dir():
            raise ValueError(f"{str(path)!r} is not an existing directory")
        return path

    @field_validator("adapter_store")
    @classmethod
    def _store_url(cls, url: str | None) -> str | None:
        if url is not None:
            parse_store_url(url)  # ValueError naming what is wrong
        return url

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        for flag, value in (("s3_endpoint_url", self.s3_endpoint_url), ("registry_db", self.registry_db),
                            ("adapter_disk_cache_bytes", self.adapter_disk_cache_bytes)):  # fmt: skip
            if value is not None and self.adapter_store is None:  # it would do nothing: refuse
                raise ValueError(f"{flag} is set but adapter_store is not: it applies to an adapter store only")
        keyless = self.api_key is None and self.admin_key is None
        for flag, on in (("health_requires_key", self.health_requires_key),
                         ("metrics_requires_key", self.metrics_requires_key)):  # fmt: skip
            if on and keyless:  # it would do nothing: refuse rather than leave the endpoint open behind its back
                raise ValueError(f"{flag} is set but no api_key or admin_key is configured: there is no key to require")
        if self.merge_dominant and self.quantize != "none":
            raise ValueError(f"merge_dominant needs a dense base; quantize={self.quantize} is served unmerged only")
        if self.max_tokens_per_step < self.max_batch_size:
            raise ValueError("max_tokens_per_step must be at least max_batch_size")
        return self
