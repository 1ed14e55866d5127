"""Settings of the merge service: flags, or environment variables prefixed LORAMERGE_MERGE_."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loramerge_common.server import ServerSettings
from loramerge_common.settings import GiB, MiB, SettingsError, setting

ENV_PREFIX = "LORAMERGE_MERGE_"


@dataclass(frozen=True)
class MergeSettings(ServerSettings):
    """loramerge merge service: merges LoRA adapters and streams the result over gRPC."""

    listen: str = setting("0.0.0.0:50061", "host:port to serve gRPC on (port 0 picks a free port)")
    metrics_port: int = setting(9461, "HTTP port for Prometheus /metrics; 0 turns it off")
    adapter_root: Path | None = setting(None, "directory holding local adapters (ids are paths under it)")
    hub_token_env: str = setting("HF_TOKEN", "name of the environment variable holding the Hub token")
    hub_cache_dir: Path | None = setting(None, "Hugging Face Hub cache directory (default: the hub's own)")
    cache_memory_bytes: int = setting(
        1 * GiB, "bound of the in-memory cache of merged adapters", byte_size=True
    )
    cache_disk_bytes: int = setting(
        10 * GiB, "bound of the disk cache (used when cache_dir is set)", byte_size=True
    )
    cache_dir: Path | None = setting(None, "directory of the disk cache; unset: memory only")
    chunk_bytes: int = setting(1 * MiB, "size of the data chunks streamed by Merge", byte_size=True)
    max_adapters: int = setting(16, "most adapters one request may merge")
    max_adapter_bytes: int = setting(
        2 * GiB, "largest adapter (its files) accepted; 0: no limit", byte_size=True
    )
    max_request_bytes: int = setting(
        8 * GiB, "most input bytes one merge may read; 0: no limit", byte_size=True
    )
    max_concurrent_builds: int = setting(2, "merges computed at the same time; others wait")
    max_queued_builds: int = setting(
        64,
        "merges of new keys that may wait for a build slot; beyond, RESOURCE_EXHAUSTED (requests for a "
        "key already building always join it); 0: no limit",
    )
    device: str = setting("auto", "where merges run: auto, cpu or cuda")
    s3_endpoint_url: str | None = setting(None, "S3-compatible endpoint (MinIO, Ceph...); unset: AWS")
    s3_region: str | None = setting(None, "S3 region; unset: boto3's choice (AWS_REGION, profile)")
    s3_addressing_style: str = setting("auto", "S3 addressing: auto, path or virtual")
    s3_cache_dir: Path | None = setting(None, "where S3 downloads are kept; unset: ~/.cache/loramerge/s3")
    s3_cache_bytes: int = setting(10 * GiB, "bound of the S3 download cache", byte_size=True)

    def validate(self) -> None:
        """Raise SettingsError for values that parse but make no sense."""
        checks = [
            (
                self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                "device",
                self.device,
            ),
            (self.chunk_bytes >= 1024, "chunk_bytes", self.chunk_bytes),
            (self.chunk_bytes <= self.max_send_message_bytes - 1024, "chunk_bytes", self.chunk_bytes),
            (self.max_adapters >= 1, "max_adapters", self.max_adapters),
            (self.max_concurrent_builds >= 1, "max_concurrent_builds", self.max_concurrent_builds),
            (self.max_queued_builds >= 0, "max_queued_builds", self.max_queued_builds),
            (self.cache_memory_bytes >= 0, "cache_memory_bytes", self.cache_memory_bytes),
            (self.log_format in ("json", "text"), "log_format", self.log_format),
            (
                self.s3_addressing_style in ("auto", "path", "virtual"),
                "s3_addressing_style",
                self.s3_addressing_style,
            ),
        ]
        for ok, name, value in checks:
            if not ok:
                raise SettingsError(
                    f"{ENV_PREFIX}{name.upper()} / --{name.replace('_', '-')}: bad value {value!r}"
                )

    def hub_token(self) -> str | None:
        """The Hub token from the variable named by hub_token_env; kept out of the settings and logs."""
        return os.environ.get(self.hub_token_env) or None
