"""The merged adapter as PEFT files: adapter_config.json and adapter_model.safetensors.

The scale is folded into the factors, so the config says lora_alpha = r and use_rslora = false
(scale 1 for PEFT and vLLM alike), and holds only keys PEFT knows (it warns about others).

Where the merge came from is recorded twice:
- in the safetensors metadata: the merge key and the canonical request (content digests, weights,
  parameters) — everything that decides the bytes and nothing else, so one key has one file;
- in a sidecar ``loramerge.json`` written beside the two PEFT files: the same plus the request as
  asked (adapter ids, revisions, max_rank).

The safetensors bytes are deterministic: tensors in sorted-name order, fixed metadata
(``safetensors_file.py`` lays them out and fills them in place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import FailedPrecondition
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from merge_service.merged import MergedAdapter
from merge_service.spec import Dtype

PEFT_PREFIX = "base_model.model."
SIDECAR_FILE = "loramerge.json"

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
    *, rank: int, modules: Iterable[str], base_model: str, task_type: str | None
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
    }


def config_json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_peft_dir(built: MergedAdapter, out_dir: Path, *, overwrite: bool = False) -> None:
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
        if built.record_json:
            _fsync_write(tmp / SIDECAR_FILE, built.record_json.encode())
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
