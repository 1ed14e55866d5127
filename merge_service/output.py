"""The merged adapter as PEFT files: adapter_config.json and adapter_model.safetensors.

The scale is folded into the factors, so the config says lora_alpha = r and use_rslora = false
(scale 1 for PEFT and vLLM alike). The config carries a "loramerge" record (merge key, algorithm
version, the effective request); PEFT and vLLM ignore keys they do not know.

The safetensors bytes are deterministic: tensors are written in sorted-name order with fixed
metadata, so the same factors always give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as save_safetensors

from loramerge_common.errors import FailedPrecondition
from merge_service.sources.base import CONFIG_FILE, WEIGHTS_FILE
from merge_service.spec import Dtype

if TYPE_CHECKING:
    from merge_service.pipeline import BuiltAdapter

PEFT_PREFIX = "base_model.model."
RECORD_KEY = "loramerge"
METADATA = {"format": "pt"}

TORCH_DTYPES: dict[Dtype, torch.dtype] = {
    Dtype.FLOAT32: torch.float32,
    Dtype.BFLOAT16: torch.bfloat16,
    Dtype.FLOAT16: torch.float16,
}


def tensor_names(module: str) -> tuple[str, str]:
    """PEFT's names of a module's (A, B) tensors."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def target_modules(modules: Iterable[str]) -> list[str]:
    """Sorted distinct last name components ("q_proj", ...), the usual PEFT target_modules form."""
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def adapter_config(
    *, rank: int, modules: Iterable[str], base_model: str, task_type: str | None, record: Mapping[str, Any]
) -> dict[str, Any]:
    """adapter_config.json of the merged adapter: plain LoRA, scale 1 (lora_alpha = r, no rsLoRA)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": target_modules(modules),
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        RECORD_KEY: dict(record),
    }


def config_json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The adapter_model.safetensors bytes: contiguous CPU tensors, sorted names, fixed metadata."""
    clean = {name: tensors[name].detach().to("cpu").contiguous() for name in sorted(tensors)}
    return save_safetensors(clean, metadata=METADATA)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_peft_dir(built: BuiltAdapter, out_dir: Path, *, overwrite: bool = False) -> None:
    """Write the adapter as a PEFT directory, atomically: files go to a temporary sibling directory
    which is then renamed into place, so readers see either nothing or the whole adapter.

    An existing non-empty ``out_dir`` is replaced only with ``overwrite``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FailedPrecondition(f"output {str(out_dir)!r} exists and is not a directory", field="out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FailedPrecondition(f"output directory {str(out_dir)!r} is not empty", field="out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _fsync_write(tmp / WEIGHTS_FILE, built.data)
        _fsync_write(tmp / CONFIG_FILE, built.config_json.encode())
        if out_dir.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            old.rmdir()
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
