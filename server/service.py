"""The composition root: builds the model, registry, engine and metrics from the settings, and owns their lifetime."""

import logging
from pathlib import Path

from transformers import AutoTokenizer

from server.adapters.checkpoint import CONFIG_FILE
from server.adapters.errors import AdapterError
from server.adapters.object_store import open_store
from server.adapters.registry import AdapterExists, AdapterRegistry, AdapterSummary, RegistryError, UploadLimits
from server.config import Settings
from server.engine.engine import Engine, EngineConfig
from server.metrics import EngineView, ServerMetrics
from server.model.embedded import EMBEDDED_MODEL_ID, ensure_embedded_model
from server.model.loader import load_base_model, set_cpu_threads
from server.model.lora_model import LoraModel
from server.stale_copies import StaleCopies

log = logging.getLogger(__name__)

# Without --adapter-cache-bytes the adapter pool holds this many adapters of the largest rank (the memory 16 slots at
# --max-rank took before adapters were stored at their own rank); smaller adapters fit proportionally more.
DEFAULT_POOL_MAX_RANK_ADAPTERS = 16


class Service:
    """Everything the HTTP layer talks to. Construction loads the model (seconds); ``start`` runs the engine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # First, so that a data directory the server may not use is refused before the model is loaded (seconds).
        limits = UploadLimits(max_file_bytes=settings.max_upload_bytes, max_unpacked_bytes=settings.max_upload_bytes)
        store = open_store(settings.adapter_store, settings.s3_endpoint_url) if settings.adapter_store else None
        self.registry = AdapterRegistry(settings.data_dir, self.validate_adapter, limits, store, settings.registry_db,
                                        settings.adapter_disk_cache_bytes)  # fmt: skip
        base_dir = settings.base_model or ensure_embedded_model()
        self.base_model_id = settings.base_model.name if settings.base_model else EMBEDDED_MODEL_ID
        log.info("loading base model %s from %s", self.base_model_id, base_dir)
        set_cpu_threads(settings.cpu_threads)
        model = load_base_model(base_dir, settings.device, settings.dtype, settings.quantize)
        self.lora_model = LoraModel(
            model,
            settings.gpu_slots,
            settings.max_rank,
            op=settings.lora_op,
            pack_weights=settings.packed_weights,
            adapter_cache_bytes=settings.adapter_cache_bytes,
            default_pool_rows=DEFAULT_POOL_MAX_RANK_ADAPTERS * settings.max_rank,
        )
        log.info("LoRA op: %s; adapter pool %.0f MiB (%d rank rows), up to %d adapters",
                 self.lora_model.op_name, self.lora_model.pool_bytes / 2**20, self.lora_model.pool_rows,
                 settings.gpu_slots)  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
        self.engine = Engine(
            self.lora_model,
            self.tokenizer,
            self.registry.path,
            EngineConfig(
                max_batch_size=settings.max_batch_size,
                max_seq_len=settings.max_seq_len,
                max_tokens_per_step=settings.max_tokens_per_step,
                cpu_slots=settings.cpu_slots,
                max_queue=settings.max_queue,
                adapter_affinity=settings.adapter_affinity,
                max_prompt_tokens=settings.max_prompt_tokens,
                max_new_tokens=settings.max_new_tokens,
                request_timeout=settings.request_timeout,
                kv_cache_bytes=settings.kv_cache_bytes,
                block_size=settings.kv_block_size,
                prefix_caching=settings.prefix_caching,
                merge_dominant=settings.merge_dominant,
            ),
        )
        self.stale_copies = StaleCopies(self.registry.get, self.engine.forget_adapter)
        self.metrics = ServerMetrics(settings.metrics_adapter_labels, registered=self.registry.__contains__)
        self.engine.on_finish.append(self.metrics.observe_finished)
        self.engine.on_step.append(self.metrics.observe_step)
        self.metrics.add_engine_view(
            EngineView(
                running=lambda: self.engine.num_running,
                queued=self.engine.queue_length,
                cache_stats=lambda: self.engine.cache_stats,
                resident=self.engine.resident_counts,
                registered=lambda: len(self.registry),
                memory=self.engine.memory_stats,
            )
        )
        if settings.startup_adapters is not None:
            self.register_folder_adapters(settings.startup_adapters)

    def validate_adapter(self, folder: Path) -> AdapterSummary:
        """Read the PEFT folder fully against the loaded base model (raises AdapterError with the reason)."""
        spec = self.lora_model.read_adapter(folder).spec
        targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
        return AdapterSummary(rank=spec.max_rank, alpha=spec.lora_alpha, target_modules=targets)

    def register_folder_adapters(self, root: Path) -> None:
        """Register every PEFT save under ``root`` (one subfolder each) that is not registered yet."""
        if not root.is_dir():
            log.info("no startup adapters folder at %s", root)
            return
        for folder in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
            if folder.name in self.registry:
                continue
            try:
                self.registry.add_folder(folder.name, folder, source="startup")
                log.info("registered startup adapter %s", folder.name)
            except AdapterExists as exc:
                if folder.name not in self.registry:  # an unregistered folder of that name is in the data directory
                    log.warning("startup adapter %s refused: %s", folder.name, exc)
                # else another server on the same data directory (a replica) registered it first
            except (AdapterError, RegistryError) as exc:
                log.warning("startup adapter %s refused: %s", folder.name, exc)

    def adapter_state(self, name: str) -> str:
        return self.engine.adapter_tier(name)

    def delete_adapter(self, name: str) -> None:
        self.registry.delete(name)
        self.engine.forget_adapter(name)
        self.metrics.forget_adapter(name)  # after the registry: late finishes then count as __deleted__

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.shutdown()

    @property
    def ready(self) -> bool:
        return self.engine.running
