"""An all-zero LoRA adapter (B = 0) for the served base model.

vLLM 0.32 on CPU gives wrong tokens to a request without a LoRA when it is batched with LoRA
requests (the "no adapter" slot index -1 selects the last adapter's weights). Routing base-model
requests through an adapter whose delta is exactly zero keeps every batch an adapter batch, which
is served correctly, and costs one LoRA slot.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE

ZERO_ADAPTER_NAME = "loramerge-base"


def linear_module_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer inside the decoder blocks, by PEFT module name.

    Builds the model on the meta device from its config alone (no weights are read).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            shapes[name] = (module.out_features, module.in_features)
    if not shapes:
        raise ValueError(f"model {model!r} has no linear layers inside decoder blocks")
    return shapes


def write_zero_adapter(out_dir: Path, model: str, base_model_name: str, rank: int = 1) -> Path:
    """Write a rank-``rank`` PEFT adapter for ``model`` whose every B factor is zero, so ΔW = s·B·A = 0.

    A is non-zero (ones scaled by 1/sqrt(in)) so that nothing downstream mistakes it for an empty tensor.
    """
    from safetensors.torch import save_file

    shapes = linear_module_shapes(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, (d_out, d_in) in shapes.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.full((rank, d_in), d_in**-0.5)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros((d_out, rank))
    config = {
        "base_model_name_or_path": base_model_name,
        "bias": "none",
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": rank,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in shapes}),
        "task_type": "CAUSAL_LM",
        "use_rslora": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
