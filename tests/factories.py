"""Tiny models and LoRA adapters built locally for tests (nothing is downloaded).

``make_tiny_llama`` writes a random ``LlamaForCausalLM`` (safetensors) with a byte-level BPE
tokenizer trained on a few lines of text; ``AutoTokenizer.from_pretrained`` and vLLM (CPU) both
load the directory. ``make_adapter`` writes a PEFT LoRA adapter for such a model (or for any
``LlamaConfig``), with B randomised so that its delta is non-zero.

Both are deterministic for a given seed: the same arguments give byte-identical weight files.

Session fixtures appended to ``tests/conftest.py``:

- ``tiny_llama``: path of a tiny Llama built with the defaults below (hidden 128, 2 layers,
  4 heads of size 32, 2 KV heads, intermediate 256, vocab 320), base model name = its path.
- ``adapter_root``: a directory holding adapters for ``tiny_llama`` on all seven projections:
  ``a`` (r 8, alpha 16), ``b`` (r 4, alpha 8), ``c`` (r 8, alpha 16, rsLoRA),
  ``e`` (r 8, alpha 32, different seed), ``d`` (r 8, alpha 16, base model name "other/base-model").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Head sizes vLLM's CPU attention accepts (vllm/v1/attention/backends/cpu_attn.py).
_VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A merged adapter is served by a vLLM engine in a few milliseconds.",
    "Low-rank adaptation adds a product of two small matrices to each weight.",
    "rev: abcd = dcba\nupper: hello = HELLO\ncopy: tiny = tiny\n",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" # $ % & @ ^ _ ` | ~",
    "Once upon a time, there was a tiny model that could only say a few words.",
]

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


# A small chat template in the shape real ones take (BOS written by the template, role markers,
# an opened assistant turn), so chat requests exercise the tokenizer's own rendering.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _build_tokenizer(vocab_size: int, model_max_length: int):
    """A byte-level BPE tokenizer with <s>, </s>, <pad>, trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=model_max_length
    )


def make_tiny_llama(
    out_dir: Path | str,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    vocab: int = 320,
    head_dim: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> Path:
    """Write a random LlamaForCausalLM plus tokenizer to ``out_dir`` and return the path.

    ``head_dim`` defaults to hidden // heads; vLLM's CPU attention needs it in
    {32, 64, 80, ...}, so a ValueError is raised for other sizes.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = head_dim or hidden // heads
    if head_dim not in _VLLM_CPU_HEAD_SIZES:
        raise ValueError(f"head_dim {head_dim} is not supported by vLLM's CPU attention")
    tokenizer = _build_tokenizer(vocab, max_position_embeddings)
    vocab_size = max(vocab, len(tokenizer))
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def _llama_config(base_dir_or_config):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(base_dir_or_config, PretrainedConfig):
        return base_dir_or_config, getattr(base_dir_or_config, "_name_or_path", "") or "tiny-llama"
    path = Path(base_dir_or_config)
    return AutoConfig.from_pretrained(path), str(path)


def make_adapter(
    out_dir: Path | str,
    base_dir_or_config,
    *,
    r: int = 8,
    alpha: float = 16,
    use_rslora: bool = False,
    target_modules: Iterable[str] = ALL_PROJECTIONS,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
    scale: float = 0.1,
    base_model_name: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) and return its path.

    A comes from PEFT's seeded initialisation; B (zero in PEFT) is replaced by N(0, scale²) draws.
    ``base_model_name`` overrides the recorded base_model_name_or_path (default: the base path,
    or the config's name).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config, default_name = _llama_config(base_dir_or_config)
    out = Path(out_dir)
    torch.manual_seed(seed)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base = base.to_empty(device="cpu")
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=list(target_modules),
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    model.peft_config["default"].base_model_name_or_path = base_model_name or default_name
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    _normalise_config(out / "adapter_config.json")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card template: noise in test dirs
    return out


def _normalise_config(path: Path) -> None:
    """Rewrite adapter_config.json with sorted keys so identical adapters give identical bytes."""
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def lora_delta(adapter_dir: Path | str, module: str) -> torch.Tensor:
    """ΔW = s·B·A of one module of a saved adapter, computed straight from its files (an oracle helper)."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    tensors = load_file(d / "adapter_model.safetensors")
    prefix = f"base_model.model.{module}"
    A = tensors[f"{prefix}.lora_A.weight"].float()
    B = tensors[f"{prefix}.lora_B.weight"].float()
    r = A.shape[0]
    alpha = cfg["lora_alpha"]
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            alpha = value
    s = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    return s * (B @ A)
