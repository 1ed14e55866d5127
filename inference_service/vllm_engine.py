"""The embedded vLLM engine: one AsyncLLM with LoRA enabled, and the route base-model requests take.

vLLM runs the model in child processes (spawn), so ``Engine.start`` must be called from a program
whose start-up sits under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from inference_service.settings import KV_CACHE_CPU_DEFAULT, EngineSettings
from inference_service.zero_adapter import ZERO_ADAPTER_NAME, write_zero_adapter
from loramerge.errors import InvalidArgument, ResourceExhausted, Unavailable, shown
from loramerge.v1 import inference_pb2

log = logging.getLogger(__name__)

ZERO_ADAPTER_ID = 1  # lora_int_id of the all-zero base adapter; merged adapters get ids above it
CPU_BLOCK_SIZE = 32  # vLLM's CPU attention needs KV blocks in multiples of 32


_SAMPLING_FIELDS = frozenset(inference_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


def request_field(vllm_parameter: str | None) -> str:
    """Our request field for a parameter vLLM names in a validation error."""
    if vllm_parameter in _SAMPLING_FIELDS:
        return f"sampling.{vllm_parameter}"
    return "prompt"


def has_gpu() -> bool:
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


@dataclass(frozen=True)
class EngineInfo:
    model: str
    model_name: str
    max_lora_rank: int
    max_model_len: int
    base_via_zero_adapter: bool
    device: str


class Engine:
    """AsyncLLM plus the LoRA calls the registry needs, with vLLM errors turned into domain errors."""

    def __init__(self, llm, info: EngineInfo, base_lora) -> None:
        self._llm = llm
        self.info = info
        self._base_lora = base_lora  # LoRARequest of the zero adapter, or None

    @classmethod
    async def start(cls, settings: EngineSettings, work_dir: Path) -> Engine:
        """Start vLLM on ``settings.model``; on CPU (or when asked) register the all-zero base adapter."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        if not settings.model:
            raise InvalidArgument("model must be set (a local directory or a hub id), got ''", field="model")
        gpu = has_gpu()
        zero = {"auto": not gpu, "true": True, "false": False}.get(settings.base_via_zero_adapter.lower())
        if zero is None:
            raise InvalidArgument(
                f"base_via_zero_adapter must be auto, true or false, got {settings.base_via_zero_adapter!r}",
                field="base_via_zero_adapter",
            )
        dtype = settings.dtype if settings.dtype != "auto" or gpu else "float32"
        kv_bytes = settings.kv_cache_bytes or (None if gpu else KV_CACHE_CPU_DEFAULT)
        args = AsyncEngineArgs(
            model=settings.model,
            served_model_name=settings.model_name,
            dtype=dtype,
            max_model_len=settings.max_model_len,
            enable_lora=True,
            max_lora_rank=settings.max_lora_rank,
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
            kv_cache_memory_bytes=kv_bytes,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager or not gpu,
            block_size=None if gpu else CPU_BLOCK_SIZE,
            disable_log_stats=True,
        )
        log.info(
            "starting vLLM: model=%s dtype=%s kv_cache_bytes=%s gpu=%s", settings.model, dtype, kv_bytes, gpu
        )
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)  # keeps the gRPC loop answering
        base_lora = None
        try:
            if zero:
                path = write_zero_adapter(work_dir / ZERO_ADAPTER_NAME, settings.model, settings.model_name)
                base_lora = LoRARequest(ZERO_ADAPTER_NAME, ZERO_ADAPTER_ID, str(path))
                # Not pinned: a pinned adapter keeps one of the max_loras batch slots that vLLM's scheduler
                # still hands out, so max_loras distinct merged adapters in one batch evict one of their
                # own and the worker dies. Unpinned, vLLM evicts it like any adapter and reloads it
                # from its folder, which lives in work_dir as long as the service.
                await llm.add_lora(base_lora)
        except BaseException:
            llm.shutdown()
            raise
        info = EngineInfo(
            model=settings.model,
            model_name=settings.model_name,
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len,
            base_via_zero_adapter=zero,
            device="gpu" if gpu else "cpu",
        )
        return cls(llm, info, base_lora)

    @property
    def reserved_lora_slots(self) -> int:
        """vLLM CPU-cache slots kept free of merged adapters (the zero adapter's, when it serves base
        requests), so that the registry's bound does not make vLLM evict it on every load."""
        return 1 if self._base_lora is not None else 0

    async def add_lora(self, name: str, lora_int_id: int, path: Path) -> None:
        """Load an adapter directory into vLLM; a bad one raises InvalidArgument and the engine lives on."""
        from vllm.lora.request import LoRARequest

        self._raise_if_dead()
        try:
            await self._llm.add_lora(LoRARequest(name, lora_int_id, str(path)))
        except Exception as e:
            self._raise_if_dead()
            raise InvalidArgument(
                f"vLLM rejected adapter {name}: {shown(str(e), 300, quote=False)}", field="adapter"
            ) from e

    async def remove_lora(self, lora_int_id: int) -> None:
        if self._llm.errored:
            return
        try:
            await self._llm.remove_lora(lora_int_id)
        except Exception:  # already gone from vLLM's cache is fine: the registry forgets it anyway
            log.warning("remove_lora(%d) failed", lora_int_id, exc_info=True)

    def lora_request(self, name: str | None, lora_int_id: int = 0, path: Path | None = None):
        """The LoRARequest a generate call carries: the adapter's, or the base route's for ``name=None``."""
        from vllm.lora.request import LoRARequest

        if name is None:
            return self._base_lora
        return LoRARequest(name, lora_int_id, str(path))

    async def generate(self, prompt: str, params, request_id: str, lora_request) -> AsyncIterator:
        """vLLM's RequestOutput stream. Cancelling or closing the consumer aborts the request in vLLM."""
        from vllm.exceptions import VLLMClientError, VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        self._raise_if_dead()
        stream = self._llm.generate(prompt, params, request_id, lora_request=lora_request)
        try:
            async with contextlib.aclosing(stream):  # closing it is what aborts the request in vLLM
                async for out in stream:
                    yield out
        except EngineDeadError as e:
            raise Unavailable("the vLLM engine has died; the service must be restarted") from e
        except VLLMValidationError as e:
            raise InvalidArgument(shown(str(e), 300, quote=False), field=request_field(e.parameter)) from e
        except VLLMClientError as e:
            raise ResourceExhausted(f"vLLM refused the request: {shown(str(e), 300, quote=False)}") from e
        except EngineGenerateError as e:
            if isinstance(e.__cause__, ValueError | TypeError):  # input vLLM could not process
                raise InvalidArgument(
                    f"vLLM could not process the request: {shown(str(e.__cause__), 300, quote=False)}",
                    field="prompt",
                ) from e
            raise
        except ValueError as e:
            raise InvalidArgument(shown(str(e), 300, quote=False), field="prompt") from e

    @property
    def healthy(self) -> bool:
        return not self._llm.errored

    def _raise_if_dead(self) -> None:
        if self._llm.errored:
            raise Unavailable("the vLLM engine has died; the service must be restarted")

    def tokenizer(self):
        """The Hugging Face tokenizer vLLM loaded for the base model (chat templates, token texts)."""
        return self._llm.get_tokenizer()

    def shutdown(self) -> None:
        """Stop vLLM's processes (once: AsyncLLM.__del__ would shut down again during interpreter
        teardown, where vLLM's module globals are already gone, and fail noisily)."""
        llm, self._llm = self._llm, _Stopped()
        llm.shutdown()
        llm.shutdown = lambda timeout=None: None


class _Stopped:
    """Stands in for the AsyncLLM after shutdown: the engine reads as dead."""

    errored = True

    def shutdown(self) -> None:
        pass
