"""Prometheus metrics of the inference service (beside the shared per-RPC ones in loramerge_common)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class InferenceMetrics:
    """Adapter lookups and fetches, generation latency and tokens.

    ``kind`` labels say how a request chose its weights: base, adapter (adapter_id), merged
    (merged_adapters) or key (merge_key).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.adapter_lookups = Counter(
            "loramerge_inference_adapter_lookups_total",
            "Adapter lookups by result: loaded (served from the registry, no merge call), "
            "fetched (this request fetched it), joined (waited on another request's fetch)",
            ["result"],
            registry=registry,
        )
        self.spec_rechecks = Counter(
            "loramerge_inference_spec_rechecks_total",
            "Remembered request specs confirmed again with the merge service's Plan once their TTL ran "
            "out, by result: same (key unchanged), changed (new key: fetched), unreachable (the loaded "
            "adapter kept serving), failed (the spec no longer resolves: the request failed)",
            ["result"],
            registry=registry,
        )
        self.merge_calls = Counter(
            "loramerge_inference_merge_calls_total",
            "Merge RPCs made to the merge service (retries and resumes count once each), by outcome",
            ["outcome"],
            registry=registry,
        )
        self.merge_retries = Counter(
            "loramerge_inference_merge_retries_total",
            "Merge attempts retried after a retryable status, by status code",
            ["code"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            "loramerge_inference_adapter_loads_total",
            "Adapters registered with vLLM, by how they arrived (merge or push) and outcome",
            ["via", "outcome"],
            registry=registry,
        )
        self.evictions = Counter(
            "loramerge_inference_adapter_evictions_total",
            "Adapters unloaded from vLLM and removed from disk, by reason (lru or request)",
            ["reason"],
            registry=registry,
        )
        self.loaded = Gauge(
            "loramerge_inference_adapters_loaded", "Adapters registered with vLLM now", registry=registry
        )
        self.loaded_bytes = Gauge(
            "loramerge_inference_adapters_loaded_bytes",
            "Bytes of adapter weights on the adapter directory now",
            registry=registry,
        )
        self.fetch_seconds = Histogram(
            "loramerge_inference_adapter_fetch_seconds",
            "Adapter arrival by phase: merge (until the header), transfer (the bytes), load (add_lora)",
            ["phase"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.first_token_seconds = Histogram(
            "loramerge_inference_time_to_first_token_seconds",
            "From the request's arrival to its first generated token (adapter fetch included)",
            ["kind"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.generate_seconds = Histogram(
            "loramerge_inference_generate_seconds",
            "From the request's arrival to its last token",
            ["kind"],
            registry=registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.generations = Counter(
            "loramerge_inference_generations_total",
            "Finished generations by kind and finish reason",
            ["kind", "finish_reason"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "loramerge_inference_prompt_tokens_total", "Prompt tokens processed", ["kind"], registry=registry
        )
        self.completion_tokens = Counter(
            "loramerge_inference_completion_tokens_total", "Tokens generated", ["kind"], registry=registry
        )
        self.aborted = Counter(
            "loramerge_inference_aborted_total",
            "Generations aborted in vLLM because the client went away or the deadline passed",
            registry=registry,
        )
