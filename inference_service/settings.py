"""Settings of the inference service: flags, or environment variables prefixed LORAMERGE_INFERENCE_."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from loramerge_client.retry import RetryPolicy
from loramerge_common.server import ServerSettings
from loramerge_common.settings import MiB, setting

ENV_PREFIX = "LORAMERGE_INFERENCE_"


@dataclass(frozen=True)
class EngineSettings:
    """What the vLLM engine is started with."""

    model: str = setting("", "base model: a local directory or a Hugging Face Hub id (required)")
    served_model_name: str = setting(
        "", "base model name merged adapters must name (base_model_name_or_path); empty: the model"
    )
    dtype: str = setting("auto", "weights dtype: auto (float32 without a GPU), float32, bfloat16, float16")
    max_model_len: int = setting(2048, "longest prompt + completion, in tokens")
    max_loras: int = setting(4, "adapters in one batch (vLLM max_loras)")
    max_cpu_loras: int = setting(16, "adapters vLLM keeps ready in host memory (vLLM max_cpu_loras)")
    max_lora_rank: int = setting(64, "highest adapter rank the engine serves; merges are capped at it")
    kv_cache_bytes: int = setting(
        0, "KV cache size; 0: vLLM's default on a GPU, 1 GiB without one", byte_size=True
    )
    gpu_memory_utilization: float = setting(0.9, "fraction of GPU memory vLLM may use (GPU only)")
    enforce_eager: bool = setting(False, "disable CUDA graphs / compilation (always on without a GPU)")
    base_via_zero_adapter: str = setting(
        "auto",
        "serve base-model requests through an all-zero adapter: auto (only without a GPU, where vLLM "
        "0.32 mixes up base and LoRA rows in one batch), true, false",
    )
    adapter_dir: Path = setting(
        Path("/dev/shm/loramerge-adapters"), "where received adapters are written (tmpfs is best)"
    )
    max_loaded_adapters: int = setting(
        0, "adapters kept registered; the least recently used is unloaded; 0: max_cpu_loras - 1"
    )
    max_adapter_bytes: int = setting(1024 * MiB, "largest adapter weights file accepted", byte_size=True)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


@dataclass(frozen=True)
class MergeClientSettings:
    """How the merge service is reached."""

    merge_service: str = setting(
        "127.0.0.1:50061",
        "merge service address; dns:///name:port balances round-robin over every address of a name",
    )
    merge_tls_ca: Path | None = setting(None, "CA bundle to verify the merge service (enables TLS)")
    merge_tls_cert: Path | None = setting(None, "client certificate for mTLS to the merge service")
    merge_tls_key: Path | None = setting(None, "client key for mTLS to the merge service", secret=True)
    merge_auth_token_file: Path | None = setting(None, "file holding a bearer token for the merge service")
    fetch_timeout_ceiling_seconds: float = setting(
        1800.0,
        "longest one adapter fetch may take (a TIES merge of an 8B model on a CPU merge service takes "
        "minutes): a request's own deadline bounds its fetch up to this; a request without one gets it",
    )
    merge_retry_initial_seconds: float = setting(
        0.2,
        "first back-off when the merge service is unavailable (UNAVAILABLE, ABORTED, or CANCELLED by "
        "the server); doubles per attempt",
    )
    merge_retry_max_seconds: float = setting(5.0, "longest back-off between retries")
    merge_retry_jitter: float = setting(0.2, "each back-off is scaled by a random factor in 1 ± this")
    merge_retry_max_attempts: int = setting(0, "attempts per fetch; 0: retry until the deadline")

    def merge_retry_policy(self) -> RetryPolicy:
        """The client library's retry policy (loramerge_client.retry), with these settings."""
        return RetryPolicy(
            max_attempts=self.merge_retry_max_attempts or sys.maxsize,
            initial_backoff=self.merge_retry_initial_seconds,
            max_backoff=self.merge_retry_max_seconds,
            jitter=self.merge_retry_jitter,
        )

    spec_cache_entries: int = setting(
        4096, "remembered request-spec -> merge-key pairs (lets a repeated spec skip the merge service)"
    )
    spec_ttl_seconds: float = setting(
        60.0,
        "after this long a remembered spec -> merge-key pair is confirmed again with the merge service's "
        "Plan (a hub branch, S3 object or local folder may have changed); hub commits and S3 revisions "
        "are never re-checked; 0: never",
    )
    spec_recheck_timeout_seconds: float = setting(
        2.0, "longest such a check may take; if it fails, the loaded adapter keeps serving"
    )


@dataclass(frozen=True)
class InferenceSettings(MergeClientSettings, EngineSettings, ServerSettings):
    """loramerge inference service: vLLM with merged LoRA adapters fetched from the merge service."""

    listen: str = setting("0.0.0.0:50051", "host:port to serve gRPC on (port 0 picks a free port)")
    metrics_port: int = setting(9451, "HTTP port for Prometheus /metrics; 0 turns it off")
    ready_file: Path | None = setting(
        None, "once serving, write {address, port, metrics_port, pid} as JSON here (tests, scripts)"
    )
    http_listen: str = setting(
        "0.0.0.0:8000",
        "host:port of the OpenAI- and LoRAX-compatible HTTP API (same TLS, token and limits as gRPC); "
        "empty turns it off",
    )
    recipes: Path | None = setting(
        None, "YAML or JSON file of named merge recipes (name -> MergeSpec JSON), served by name on every API"
    )
    chat_template: Path | None = setting(
        None, "Jinja chat template file for chat requests; default: the base model tokenizer's own"
    )
    exit_on_engine_death: bool = setting(
        True,
        "when the vLLM engine dies, fail calls in flight with UNAVAILABLE and exit non-zero so that the "
        "pod is restarted; false: stay up, NOT_SERVING",
    )

    def loaded_bound(self, reserved_slots: int) -> int:
        """Adapters kept registered: max_loaded_adapters, or what vLLM's CPU cache holds beside
        its reserved slots."""
        return self.max_loaded_adapters or max(1, self.max_cpu_loras - reserved_slots)


KV_CACHE_CPU_DEFAULT = 1024 * MiB
