"""A PEFT LoRA adapter in memory: its config, its per-module factors, and the checks that keep hostile
files out.

Nothing here trusts the files. ``adapter_config.json`` is size-capped and type-checked; the safetensors
header is parsed and checked by hand (length, JSON, dtypes, offsets, total size) before a single tensor
byte is read, and the tensors are then decoded by ``safetensors`` (never ``torch.load``; pickled
``adapter_model.bin`` weights are refused, never opened).

Errors (every message names the adapter and the reason; ``field`` is the request field at fault):

- ``NotFound``: the adapter's files are missing.
- ``InvalidArgument``: the files are malformed or lie about themselves: bad JSON, a truncated or corrupt
  safetensors file, a header whose offsets or sizes disagree with the file, a non-float dtype, a missing
  lora_A/lora_B tensor, shapes that disagree with the config (including a config lying about its rank),
  NaN/Inf values, tensors that are not LoRA factors.
- ``FailedPrecondition``: a well-formed adapter that cannot be served as plain LoRA: DoRA, LoRA bias,
  ``modules_to_save``, embedding-layer LoRA, a non-LoRA PEFT type, pickled ``.bin`` weights only.
  Also files that exist but cannot be read.
- ``ResourceExhausted``: the files exceed ``max_bytes`` (checked from the file sizes before reading).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from loramerge.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    LoramergeError,
    NotFound,
    shown,
)
from merge_service.sources.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ResolvedSource,
    check_size,
    content_digest,
    missing_weights_error,
)
from merge_service.spec import SourceKind

PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
# safetensors itself refuses headers above 100 MB; a LoRA header is a few hundred bytes per tensor.
MAX_HEADER_BYTES = 100_000_000

# Float dtypes a LoRA factor may be stored in, with their element sizes.
FLOAT_DTYPES: dict[str, int] = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _err(cls: type[LoramergeError], adapter_id: str, reason: str, field: str) -> LoramergeError:
    return cls(f"adapter {shown(adapter_id)}: {reason}", field=field)


def pattern_key(patterns: Any, module: str) -> str | None:
    """The first key of ``patterns`` that matches ``module`` the way PEFT's ``get_pattern_key`` does:
    the key, as a regex, must match the whole name or a dot-separated suffix of it (``(.*\\.)?key$``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that define the factors and their scale."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: tuple[str, ...]
    base_model: str
    raw: dict = field(repr=False)
    # PEFT also accepts target_modules as one regex that must match the whole module name.
    target_modules_regex: bool = False

    def rank_for(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, module: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA, using this module's own rank and alpha."""
        r = self.rank_for(module)
        return self.alpha_for(module) / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, module: str) -> bool:
        """Whether ``module`` is one PEFT would have adapted under ``target_modules``."""
        if self.target_modules_regex:
            return re.fullmatch(self.target_modules[0], module) is not None
        if "all-linear" in self.target_modules:
            return True
        return any(module == t or module.endswith("." + t) for t in self.target_modules)


@dataclass(frozen=True)
class LoraModule:
    """One adapter's factors for one module: ΔW = scale · B @ A, with A (r, d_in) and B (d_out, r).

    The loader makes them (float32, or 16-bit as stored with ``keep_16bit``); the module merge and the
    interference report read them in float32 (``float32()``)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def float32(self) -> LoraModule:
        """These factors in float32 (self when they are already): widening 16-bit floats is exact."""
        if self.A.dtype == torch.float32 and self.B.dtype == torch.float32:
            return self
        return LoraModule(A=self.A.to(torch.float32), B=self.B.to(torch.float32), scale=self.scale)


@dataclass
class LoraAdapter:
    id: str
    config: AdapterConfig
    # Keys are module names without PEFT's "base_model.model." prefix, e.g. "model.layers.0.self_attn.q_proj".
    modules: dict[str, LoraModule]
    digest: str

    @property
    def nbytes(self) -> int:
        return sum(m.A.nbytes + m.B.nbytes for m in self.modules.values())


# --------------------------------------------------------------------------------------------- config


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_config(raw: object, adapter_id: str, field: str = "adapter") -> AdapterConfig:
    """Check a decoded ``adapter_config.json`` and keep what the merge needs."""

    def bad(reason: str) -> LoramergeError:
        return _err(InvalidArgument, adapter_id, f"{CONFIG_FILE}: {reason}", field)

    def unservable(reason: str) -> LoramergeError:
        return _err(FailedPrecondition, adapter_id, reason, field)

    if not isinstance(raw, dict):
        raise bad(f"expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise unservable(f"peft_type is {shown(peft_type)}; only LORA adapters can be merged")
    if raw.get("use_dora"):
        raise unservable("DoRA adapters (use_dora=true) cannot be served as LoRA")
    if raw.get("bias", "none") not in ("none", None):
        raise unservable(f"bias={shown(raw.get('bias'))}; only bias='none' can be served")
    if raw.get("lora_bias"):
        raise unservable("LoRA bias (lora_bias=true) cannot be served")
    if raw.get("modules_to_save"):
        raise unservable(f"modules_to_save={shown(raw['modules_to_save'])} cannot be served as LoRA")
    if raw.get("target_parameters"):
        raise unservable(f"target_parameters={shown(raw['target_parameters'])} cannot be served as LoRA")

    r = raw.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad(f"r must be a positive integer, got {shown(r)}")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha) or not math.isfinite(alpha):
        raise bad(f"lora_alpha must be a finite number, got {shown(alpha)}")
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise bad(f"use_rslora must be true or false, got {shown(use_rslora)}")

    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    for name, pattern, ok in (
        ("rank_pattern", rank_pattern, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        ("alpha_pattern", alpha_pattern, lambda v: _is_number(v) and math.isfinite(v)),
    ):
        if not isinstance(pattern, dict):
            raise bad(f"{name} must be an object, got {shown(pattern)}")
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                raise bad(f"{name} key {shown(key)} is not a valid pattern ({e})") from None
            if not ok(value):
                raise bad(
                    f"{name}[{shown(key)}] must be a positive integer rank or finite alpha, got "
                    f"{shown(value)}"
                )

    targets = raw.get("target_modules")
    regex = isinstance(targets, str)
    if regex:
        try:
            re.compile(targets)
        except re.error as e:
            raise bad(f"target_modules {shown(targets)} is not a valid pattern ({e})") from None
        target_modules: tuple[str, ...] = (targets,)
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets) and targets:
        target_modules = tuple(targets)
    else:
        raise bad(f"target_modules must be a non-empty list of names or a pattern, got {shown(targets)}")

    base = raw.get("base_model_name_or_path") or ""
    if not isinstance(base, str):
        raise bad(f"base_model_name_or_path must be a string, got {shown(base)}")
    return AdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern),
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        target_modules=target_modules,
        base_model=base,
        raw=raw,
        target_modules_regex=regex,
    )


class _NotRegular(OSError):
    pass


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; a FIFO or device is refused instead of blocking the read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegular(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {shown(k)}")
        out[k] = v
    return out


def read_config(path: Path, adapter_id: str, field: str = "adapter") -> AdapterConfig:
    """Read and check ``adapter_config.json`` (``path`` is the file or its directory). No tensors are read."""
    return read_config_and_sha256(path, adapter_id, field)[0]


def read_config_and_sha256(path: Path, adapter_id: str, field: str = "adapter") -> tuple[AdapterConfig, str]:
    """``read_config`` and the sha256 of the very bytes it parsed."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise _err(
                    InvalidArgument,
                    adapter_id,
                    f"{CONFIG_FILE} is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed",
                    field,
                )
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise _err(NotFound, adapter_id, f"has no {CONFIG_FILE}", field) from None
    except _NotRegular:
        raise _err(InvalidArgument, adapter_id, f"{CONFIG_FILE} is not a regular file", field) from None
    except OSError as e:
        raise _err(
            FailedPrecondition, adapter_id, f"cannot read {CONFIG_FILE}: {e.strerror}", field
        ) from None
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise _err(InvalidArgument, adapter_id, f"{CONFIG_FILE} is not valid JSON ({e})", field) from None
    return parse_config(raw, adapter_id, field), hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section, which starts after the header
    end: int


def read_safetensors_header(
    f: BinaryIO, file_size: int, adapter_id: str, field: str = "adapter"
) -> tuple[dict[str, TensorInfo], int]:
    """Parse and check a safetensors header; return the tensors and where the data section starts.

    Layout: u64 little-endian N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, ...},
    then the data. Checked: N fits in the file, float dtypes only, end - begin = numel · itemsize,
    tensors tile the data section with no gap or overlap, and the file ends where the last tensor does.
    """

    def bad(reason: str) -> LoramergeError:
        return _err(InvalidArgument, adapter_id, f"{WEIGHTS_FILE}: {reason}", field)

    prefix = f.read(8)
    if len(prefix) < 8:
        raise bad(f"truncated: {file_size} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise bad(f"header claims {n} bytes but the file has {file_size - 8} after the length prefix")
    header_bytes = f.read(n)
    if len(header_bytes) != n:
        raise bad("truncated header")
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise bad("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise bad(f"tensor {shown(name)}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in FLOAT_DTYPES:
            raise bad(
                f"tensor {shown(name)} has dtype {shown(dtype)}; LoRA factors must be one of "
                f"{sorted(FLOAT_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {shown(name)} has an invalid shape {shown(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise bad(f"tensor {shown(name)} has invalid data_offsets {shown(offsets)}")
        nbytes = math.prod(shape) * FLOAT_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(
                f"tensor {shown(name)}: shape {shape} of {dtype} needs {nbytes} bytes, "
                f"data_offsets {offsets} span {offsets[1] - offsets[0]}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])

    data_size = file_size - 8 - n
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            kind = "overlaps another tensor" if t.begin < pos else "leaves a gap before it"
            raise bad(f"tensor {shown(name)} at data_offsets [{t.begin}, {t.end}] {kind}")
        pos = t.end
    if pos != data_size:
        raise bad(f"tensors cover {pos} data bytes but the file holds {data_size} (truncated or padded)")
    return tensors, 8 + n


def _classify(key: str) -> tuple[str, str] | str:
    """(module, "A"|"B") for a LoRA factor, else the reason the tensor cannot be served."""
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors cannot be served as LoRA"
    if "lora_embedding_" in key:
        return "embedding-layer LoRA is not supported"
    if "modules_to_save" in key or "original_module" in key:
        return "modules_to_save weights cannot be served as LoRA"
    if "trainable_tokens" in key:
        return "trainable token deltas cannot be served as LoRA"
    if key.endswith(".bias") and ".lora_" in key:
        return "LoRA bias cannot be served"
    m = _LORA_KEY.match(key)
    if m is None:
        return ""
    module = m["module"]
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX) :]
    return module, m["which"]


def check_structure(
    tensors: dict[str, TensorInfo], config: AdapterConfig, adapter_id: str, field: str = "adapter"
) -> dict[str, tuple[str, str]]:
    """Check tensor names and shapes against the config; return {module: (key of A, key of B)}."""
    pairs: dict[str, dict[str, str]] = {}
    for key in tensors:
        kind = _classify(key)
        if isinstance(kind, str):
            if kind:
                raise _err(FailedPrecondition, adapter_id, f"tensor {shown(key)}: {kind}", field)
            raise _err(
                InvalidArgument,
                adapter_id,
                f"unexpected tensor {shown(key)} (not a lora_A/lora_B weight)",
                field,
            )
        module, which = kind
        if which in pairs.setdefault(module, {}):
            raise _err(
                InvalidArgument, adapter_id, f"module {shown(module)} has two lora_{which} tensors", field
            )
        pairs[module][which] = key
    if not pairs:
        raise _err(InvalidArgument, adapter_id, f"{WEIGHTS_FILE} holds no LoRA tensors", field)

    out: dict[str, tuple[str, str]] = {}
    for module, keys in sorted(pairs.items()):
        for which in "AB":
            if which not in keys:
                other = "B" if which == "A" else "A"
                raise _err(
                    InvalidArgument,
                    adapter_id,
                    f"module {shown(module)} has lora_{other} but no lora_{which}",
                    field,
                )
        if not config.targets(module):
            raise _err(
                InvalidArgument,
                adapter_id,
                f"module {shown(module)} is not among the config's target_modules "
                f"{list(config.target_modules)}",
                field,
            )
        a, b = tensors[keys["A"]].shape, tensors[keys["B"]].shape
        if len(a) != 2 or len(b) != 2 or 0 in a or 0 in b:
            raise _err(
                InvalidArgument,
                adapter_id,
                f"module {shown(module)}: lora_A {list(a)} and lora_B {list(b)} must be non-empty matrices",
                field,
            )
        r = config.rank_for(module)
        if a[0] != r or b[1] != r:
            raise _err(
                InvalidArgument,
                adapter_id,
                f"module {shown(module)}: the config gives rank {r} but lora_A is {list(a)} and lora_B is "
                f"{list(b)} (expected ({r}, d_in) and (d_out, {r}))",
                field,
            )
        out[module] = (keys["A"], keys["B"])
    return out


# ---------------------------------------------------------------------------------------------- load


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t``: min and max propagate NaN, and are infinite iff some value is.
    (One reduction pass; much faster on CPU than materialising ``isfinite(t)``.)"""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def read_tensors(
    f: BinaryIO, infos: dict[str, TensorInfo], data_start: int, size: int
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Read a checked safetensors file (``read_safetensors_header``) straight into its tensors, one copy
    from the file each, and its hex sha256 (hashed on a second thread, in file order, while later
    tensors are read). ``None`` for the tensors when the file is not ``size`` bytes long any more.

    Reading into place, rather than the whole file into one buffer and decoding copies out of it,
    saves a pass over the file and a file-sized allocation."""
    h = hashlib.sha256()
    f.seek(0)
    h.update(f.read(data_start))
    tensors: dict[str, torch.Tensor] = {}
    complete = True
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:  # one worker: updates stay in order
        for name, info in sorted(infos.items(), key=lambda kv: kv[1].begin):
            t = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
            raw = t.reshape(-1).view(torch.uint8).numpy()
            if f.readinto(raw) != raw.nbytes:
                complete = False
                break
            hasher.submit(h.update, raw)
            tensors[name] = t
    if not complete or f.read(1):
        return None, ""
    return tensors, h.hexdigest()


def load_adapter(
    src: ResolvedSource,
    device: str = "cpu",
    *,
    max_bytes: int | None = None,
    field: str = "adapter",
    keep_16bit: bool = False,
) -> LoraAdapter:
    """Read, check and decode an adapter's two files into float32 factors on ``device``.

    ``keep_16bit``: float16 and bfloat16 factors stay as stored, to be widened one module at a time
    (``LoraModule.float32``) by a build that frees each module once merged: the inputs of a merge
    then take half the memory until their turn comes.

    The bytes decoded are hashed as they are read and compared with the content digest the plan
    resolved (local and S3 sources): a file rewritten between plan and build is Aborted (retryable),
    so nothing is ever built, let alone cached, under a key whose inputs it did not read."""
    config, config_sha = read_config_and_sha256(src.path / CONFIG_FILE, src.id, field)
    weights = src.path / WEIGHTS_FILE
    try:
        f = open_regular(weights)
    except FileNotFoundError:
        raise missing_weights_error(src.path, src.id, field) from None
    except _NotRegular:
        raise _err(InvalidArgument, src.id, f"{WEIGHTS_FILE} is not a regular file", field) from None
    except OSError as e:
        raise _err(FailedPrecondition, src.id, f"cannot read {WEIGHTS_FILE}: {e.strerror}", field) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        check_size(src.id, size + (src.path / CONFIG_FILE).stat().st_size, max_bytes, field)
        infos, data_start = read_safetensors_header(f, size, src.id, field)
        modules = check_structure(infos, config, src.id, field)
        tensors, weights_sha = read_tensors(f, infos, data_start, size)
    if tensors is None:
        raise _err(InvalidArgument, src.id, f"{WEIGHTS_FILE} changed while it was being read", field)
    read_digest = content_digest(config_sha, weights_sha)

    out: dict[str, LoraModule] = {}
    for module, (key_a, key_b) in modules.items():
        factors = []
        for key in (key_a, key_b):
            t = tensors.pop(key).to(device=device)
            if not (keep_16bit and t.dtype in (torch.float16, torch.bfloat16)):
                t = t.to(torch.float32)
            if not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise _err(
                    InvalidArgument,
                    src.id,
                    f"tensor {shown(key)} has {bad} non-finite (NaN/Inf) values",
                    field,
                )
            factors.append(t.contiguous())
        out[module] = LoraModule(A=factors[0], B=factors[1], scale=config.scale_for(module))
    # Checked last, so that bad content is still reported as such; hub digests name a commit.
    verifiable = src.kind in (SourceKind.LOCAL, SourceKind.S3) and _SHA256_DIGEST.fullmatch(src.digest)
    if verifiable and read_digest != src.digest:
        raise _err(
            Aborted,
            src.id,
            "its files changed between plan and build (the bytes read do not match the planned "
            f"digest {src.digest}); nothing was built, retry",
            field,
        )
    return LoraAdapter(id=src.id, config=config, modules=out, digest=src.digest)


_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
