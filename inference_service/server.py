"""Assemble the inference service: gRPC server first (health NOT_SERVING), then the engine.

The gRPC port answers while vLLM starts (health says NOT_SERVING and calls get UNAVAILABLE), so
probes and clients see a live process rather than a refused connection. Once the engine is up,
health turns SERVING. (With ``reuse_port``, for a rolling restart on one host, the gRPC and HTTP
ports are shared with the process being replaced and bound only once the engine is up.)
If the engine dies, a watchdog turns health NOT_SERVING; then (by default)
calls in flight fail with UNAVAILABLE, the server stops and ``serve`` raises ``EngineDied`` so that
the process exits non-zero and is restarted: a dead engine never comes back by itself. On SIGTERM
the server drains, then the engine shuts down and the adapter folder is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from grpc_health.v1.health_pb2 import HealthCheckResponse
from prometheus_client import CollectorRegistry

from inference_service.chat import ChatTemplate
from inference_service.dataplane import DataPlane
from inference_service.http_server import HttpFrontEnd, HttpOptions
from inference_service.merge_client import MergeClient
from inference_service.metrics import InferenceMetrics
from inference_service.receiver import AdapterLimits
from inference_service.recipes import RecipeBook, load_recipes
from inference_service.registry import AdapterRegistry
from inference_service.servicer import InferenceServicer
from inference_service.settings import InferenceSettings
from inference_service.vllm_engine import Engine
from loramerge.errors import Unavailable
from loramerge.v1 import inference_pb2, inference_pb2_grpc
from loramerge_common.auth import TokenAuth, load_token
from loramerge_common.metrics import RpcMetrics
from loramerge_common.server import GrpcServer, Service
from loramerge_common.shutdown import install_stop_signals, remove_stop_signals

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
WATCHDOG_SECONDS = 1.0  # reading vLLM's dead flag is cheap; a short period restarts the pod sooner
ENGINE_DEATH_GRACE_SECONDS = 5.0  # calls still running after engine death can only fail: do not wait long
ENGINE_DEAD = "the vLLM engine has died; the service is restarting"
SERVING = HealthCheckResponse.SERVING


class EngineDied(RuntimeError):
    """The vLLM engine died while serving; the service has stopped and the process should exit non-zero."""


def run_directory(adapter_dir: Path) -> Path:
    """This process's own folder under adapter_dir; folders of processes that are gone are removed."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for old in adapter_dir.glob("run-*"):
        try:
            pid = int(old.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
    return adapter_dir / f"run-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def _watchdog(engine: Engine, server: GrpcServer) -> None:
    """Return once the engine has died, with health turned NOT_SERVING."""
    while engine.healthy:
        await asyncio.sleep(WATCHDOG_SECONDS)
    log.error("the vLLM engine has died: health is NOT_SERVING")
    await server.health.set_serving(False)


async def _until_stopped(
    stop_event: asyncio.Event, watchdog: asyncio.Future, adapters: AdapterRegistry, exit_on_death: bool
) -> bool:
    """Wait for a stop signal or, when ``exit_on_death``, the engine's death; True for the latter (then
    requests waiting on an adapter fetch fail UNAVAILABLE; generations fail so inside vLLM)."""
    stop_task = asyncio.ensure_future(stop_event.wait())
    try:
        await asyncio.wait({stop_task, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        if stop_task.done():
            return False
        watchdog.result()  # raises what went wrong in the watchdog itself
        if not exit_on_death:
            log.warning("exit_on_engine_death is off: staying up, NOT_SERVING, until stopped")
            await stop_task
            return False
        adapters.abandon(Unavailable(ENGINE_DEAD))
        return True
    finally:
        stop_task.cancel()


async def serve(
    settings: InferenceSettings, stop_event: asyncio.Event | None = None, recipes: RecipeBook | None = None
) -> None:
    """Run the service until SIGTERM/SIGINT (or ``stop_event``), then drain and clean up."""
    stop_event = stop_event or asyncio.Event()
    installed = install_stop_signals(stop_event)
    registry = CollectorRegistry()
    rpc_metrics = RpcMetrics(registry)
    metrics = InferenceMetrics(registry)
    plane = DataPlane(
        metrics=metrics,
        fetch_timeout_ceiling_seconds=settings.fetch_timeout_ceiling_seconds,
        recipes=recipes if recipes is not None else RecipeBook(load_recipes(settings.recipes)),
    )
    servicer = InferenceServicer(rpc_metrics=rpc_metrics, dataplane=plane)
    server = GrpcServer(
        settings,
        [Service(SERVICE_NAME, servicer, inference_pb2_grpc.add_InferenceServiceServicer_to_server)],
        registry=registry,
        rpc_metrics=rpc_metrics,
        serving_at_start=False,
    )
    http = http_front_end(settings, plane, server, registry)
    work_dir = run_directory(settings.adapter_dir)
    engine: Engine | None = None
    adapters: AdapterRegistry | None = None
    merge_client: MergeClient | None = None
    watchdog: asyncio.Future | None = None
    engine_died = False
    # A shared port (reuse_port) is joined only once the engine is up: the kernel spreads new
    # connections over every process listening on it, and one still starting could only refuse them.
    listen_early = not settings.reuse_port
    listening = False
    try:
        if listen_early:
            listening = True  # (set first: a failed start is still stopped, as before)
            await _listen(server, http)
        engine_task = asyncio.ensure_future(Engine.start(settings, work_dir))
        stop_task = asyncio.ensure_future(stop_event.wait())
        await asyncio.wait({engine_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if not engine_task.done():  # stopped while the engine was starting
            engine_task.cancel()
            return
        stop_task.cancel()
        engine = engine_task.result()
        merge_client = MergeClient(
            settings, on_retry=lambda code: metrics.merge_retries.labels(code=code).inc()
        )
        adapters = AdapterRegistry(
            engine,
            merge_client,
            adapter_dir=work_dir,
            limits=AdapterLimits(
                base_model=engine.info.model_name,
                max_rank=engine.info.max_lora_rank,
                max_bytes=settings.max_adapter_bytes,
            ),
            max_loaded=settings.loaded_bound(engine.reserved_lora_slots),
            spec_cache_entries=settings.spec_cache_entries,
            spec_ttl=settings.spec_ttl_seconds,
            recheck_timeout=settings.spec_recheck_timeout_seconds,
            fetch_timeout_ceiling=settings.fetch_timeout_ceiling_seconds,
            metrics=metrics,
        )
        chat = ChatTemplate.for_engine(engine, settings.chat_template)
        servicer.attach(engine, adapters, chat)
        if not listening:
            listening = True
            await _listen(server, http)
        await server.health.set_serving(True)
        watchdog = asyncio.ensure_future(_watchdog(engine, server))
        log.info("inference service ready", extra={"address": server.address, "model": engine.info.model})
        if settings.ready_file is not None:
            write_ready_file(settings.ready_file, server, http)
        engine_died = await _until_stopped(stop_event, watchdog, adapters, settings.exit_on_engine_death)
    finally:
        remove_stop_signals(installed)
        if watchdog is not None:
            watchdog.cancel()
        grace = min(settings.grace_seconds, ENGINE_DEATH_GRACE_SECONDS) if engine_died else None
        grpc_stopped = asyncio.ensure_future(server.stop(grace) if listening else asyncio.sleep(0))
        if http is not None and listening:
            # Health is NOT_SERVING now, so new HTTP calls get 503 + Retry-After during the drain
            # window; then the HTTP server lets its calls in flight finish and closes.
            await asyncio.sleep(0 if engine_died else settings.drain_seconds)
            await http.stop()
        await grpc_stopped
        if adapters is not None:
            await adapters.close()
        if merge_client is not None:
            await merge_client.close()
        if engine is not None:
            engine.shutdown()
        shutil.rmtree(work_dir, ignore_errors=True)
        if settings.ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                settings.ready_file.unlink()
    if engine_died:
        raise EngineDied(ENGINE_DEAD)


async def _listen(server: GrpcServer, http: HttpFrontEnd | None) -> None:
    await server.start()
    if http is not None:
        await http.start()


def http_front_end(
    settings: InferenceSettings, plane: DataPlane, server: GrpcServer, registry: CollectorRegistry
) -> HttpFrontEnd | None:
    """The HTTP API on ``settings.http_listen`` (None when empty), with the gRPC server's TLS, token,
    size limit, metrics registry and health."""
    if not settings.http_listen:
        return None
    options = HttpOptions(
        listen=settings.http_listen,
        max_body_bytes=settings.max_receive_message_bytes,
        auth=TokenAuth(
            load_token(settings.auth_token, settings.auth_token_file),
            load_token(settings.admin_token, settings.admin_token_file),
        ),
        tls_cert=str(settings.tls_cert) if settings.tls_cert else None,
        tls_key=str(settings.tls_key) if settings.tls_key else None,
        tls_client_ca=str(settings.tls_client_ca) if settings.tls_client_ca else None,
        grace_seconds=settings.grace_seconds,
        reuse_port=settings.reuse_port,
    )
    return HttpFrontEnd(
        plane,
        options,
        serving=lambda: server.health.status() == SERVING and not server.drain.draining,
        registry=registry,
    )


def write_ready_file(path: Path, server: GrpcServer, http: HttpFrontEnd | None = None) -> None:
    """Atomically write where the service listens (a reader never sees a partial file)."""
    info = {
        "address": server.address,
        "port": server.port,
        "metrics_port": server.metrics_port,
        "http_port": http.port if http is not None else None,
        "pid": os.getpid(),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
