"""Shipped demo assets: used only when their manifest names the current asset hash and every file
matches its sha256; a tampered or stale copy is ignored (and the assets are built instead)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from demo.assets import VARIANTS, asset_hash
from demo.cache import MANIFEST_FILE, ensure_assets, shipped_dir, verified_shipped


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_shipped_builds_are_current_and_intact(variant: str) -> None:
    settings = VARIANTS[variant]
    assert verified_shipped(settings) == shipped_dir(settings), "run `python -m demo.cache ship VARIANT`"


def test_tampered_or_stale_copies_are_refused(tmp_path: Path) -> None:
    settings = VARIANTS["small"]
    copy = shipped_dir(settings, tmp_path)
    shutil.copytree(shipped_dir(settings), copy)
    logged: list[str] = []
    assert verified_shipped(settings, tmp_path, logged.append) == copy
    weights = copy / "adapters" / "facts" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert verified_shipped(settings, tmp_path, logged.append) is None
    assert "fail their sha256 check" in logged[-1]
    weights.unlink()
    assert verified_shipped(settings, tmp_path) is None  # a missing file fails too
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**manifest, "hash": "0" * 64}))
    assert verified_shipped(settings, tmp_path) is None  # another build script or settings


def test_a_fresh_cache_is_filled_from_the_shipped_build(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORAMERGE_DEMO_CACHE", str(tmp_path / "cache"))
    logged: list[str] = []
    assets = ensure_assets("small", log=logged.append)
    assert any("using the shipped build" in m for m in logged)
    assert json.loads((assets.root / "build.json").read_text())["hash"] == asset_hash(VARIANTS["small"])
    assert not (assets.root / MANIFEST_FILE).exists()
    assert (assets.root / "adapters" / "upper" / "adapter_model.safetensors").is_file()
