"""Where built demo assets live, and building them only when needed.

A build is identified by ``demo.assets.asset_hash`` (the build script's source and the settings) and
kept in ``.cache/demo-assets/<variant>-<hash>/`` (or under ``$LORAMERGE_DEMO_CACHE``). It is written
to a temporary sibling directory and renamed into place at the end, under a file lock, so concurrent
callers build once and nobody sees a half-written directory. This module is not part of the hash:
changing how assets are cached does not rebuild them.

Shipped builds: ``demo/prebuilt/<variant>-<hash>/`` holds a finished build (about 3 MB) with a
``MANIFEST.json`` of the asset hash and every file's sha256. When its hash is the current one and every
file matches its sha256, it is copied into the cache instead of building (seconds instead of minutes);
otherwise the assets are built as before. ``python -m demo.cache ship VARIANT`` writes one from a build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from demo.assets import REPO_ROOT, STAMP_FILE, VARIANTS, DemoAssets, Settings, asset_hash, build_assets

DEFAULT_CACHE_ROOT = REPO_ROOT / ".cache" / "demo-assets"
SHIPPED_ROOT = REPO_ROOT / "demo" / "prebuilt"
MANIFEST_FILE = "MANIFEST.json"


def cache_root() -> Path:
    return Path(os.environ.get("LORAMERGE_DEMO_CACHE", DEFAULT_CACHE_ROOT))


def default_dir(settings: Settings, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{settings.variant}-{asset_hash(settings)[:16]}"


def is_built(out: Path, settings: Settings) -> bool:
    """True when ``out`` holds a finished build of exactly these settings and this build script."""
    stamp = out / STAMP_FILE
    if not stamp.is_file():
        return False
    with contextlib.suppress(ValueError, OSError):
        return json.loads(stamp.read_text()).get("hash") == asset_hash(settings)
    return False


def ensure_assets(
    variant: str | Settings = "full",
    out: Path | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> DemoAssets:
    """The assets for ``variant`` (a name in ``VARIANTS`` or ``Settings``), built first unless an
    up-to-date copy exists at ``out`` (default: the cache directory named by the hash)."""
    # Not isinstance(variant, Settings): under ``python -m demo.assets`` the class lives in __main__.
    settings = VARIANTS[variant] if isinstance(variant, str) else variant
    out = Path(out) if out is not None else default_dir(settings)
    if is_built(out, settings):
        return DemoAssets(out, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / f".{out.name}.lock"):
        if is_built(out, settings):
            return DemoAssets(out, settings)
        _remove_stale_builds(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            shipped = verified_shipped(settings, log=log or _stderr)
            if shipped is not None:
                shutil.copytree(
                    shipped, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST_FILE)
                )
            else:
                build_assets(tmp, settings, log=log or _stderr)
            if out.exists():
                shutil.rmtree(out)
            _publish_permissions(tmp)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoAssets(out, settings)


def file_digests(root: Path) -> dict[str, str]:
    """sha256 (hex) of every file under ``root`` but the manifest, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def shipped_dir(settings: Settings, root: Path | None = None) -> Path:
    return default_dir(settings, root or SHIPPED_ROOT)


def verified_shipped(
    settings: Settings, root: Path | None = None, log: Callable[[str], None] = lambda _m: None
) -> Path | None:
    """The shipped build for ``settings`` when its manifest names the current asset hash and every file
    matches its sha256 (no file missing, none extra); else None."""
    d = shipped_dir(settings, root)
    manifest = d / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (ValueError, OSError):
        log(f"demo assets: {manifest} is unreadable; building instead")
        return None
    if data.get("hash") != asset_hash(settings):
        return None
    if file_digests(d) != data.get("files"):
        log(f"demo assets: the shipped files in {d} fail their sha256 check; building instead")
        return None
    log(f"demo assets ({settings.variant}): using the shipped build {d} (sha256 checked)")
    return d


def ship(settings: Settings, root: Path | None = None) -> Path:
    """Copy the (built, cached) assets for ``settings`` to the shipped directory with a manifest."""
    src = ensure_assets(settings).root
    dst = shipped_dir(settings, root)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    manifest = {"hash": asset_hash(settings), "files": file_digests(dst)}
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dst


def _remove_stale_builds(out: Path) -> None:
    """Temporary directories of builds that were killed; safe to remove while holding the lock."""
    for p in out.parent.glob(f".{out.name}.*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _publish_permissions(root: Path) -> None:
    """World-readable files (mkdtemp and safetensors create private ones)."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m demo.cache", description="ship a demo asset build")
    ap.add_argument("command", choices=["ship"])
    ap.add_argument("variant", choices=sorted(VARIANTS))
    args = ap.parse_args()
    print(ship(VARIANTS[args.variant]))
