"""Demo assets built locally and deterministically: a tiny Llama base model and four LoRA adapters.

Everything is made on the spot (no downloads): a character-level tokenizer, a base model pre-trained
on copying under random prefixes plus a memorised lookup table of its own, and four adapters with
skills an exact-match scorer can check:

- ``facts``   (knowledge) recalls a made-up table:        ``fact: kqz =vemr``
- ``upper``   (format)    upper-cases a word:              ``up: abcd =ABCD``
- ``reverse`` (format)    reverses a word:                 ``rev: abcd =dcba``
- ``sort``    (format)    sorts the letters of a word:     ``sort: dbca =abcd``

``facts`` + ``upper`` is the pair built to survive a merge: both were trained with about half of each
batch showing the base model's own behaviour under other prefixes, so each stays neutral outside its
own prefix. ``reverse`` + ``sort`` were trained the ordinary way, on their own task only; they
conflict. The output directory holds ``base/`` (a Hugging Face Llama directory), ``adapters/<name>/``
(PEFT directories), ``suite.json`` (the evaluation tasks), ``inventory.json`` and
``measurements.json`` (accuracies measured with transformers greedy decoding at build time).

The build is byte-identical for fixed settings; ``asset_hash`` (this file's source and the settings)
names it, and ``demo.cache`` keeps it until either changes. ``python -m demo.assets --variant small
--out DIR``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

BASE_MODEL_NAME = "loramerge-demo-base"
REPO_ROOT = Path(__file__).resolve().parents[1]
STAMP_FILE = "build.json"

EOS = "\n"
SPECIALS = ["<pad>", "<unk>", "<s>"]
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
DIGITS = "0123456789"
CHARS = [EOS, " ", ":", "=", *DIGITS, *LOWER, *UPPER]
VOCAB_SIZE = 72  # specials + characters, padded to a multiple of 8 with unused tokens
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
RESERVED_PREFIXES = frozenset({"fact", "up", "rev", "sort"})
MAX_NEW_TOKENS = 12


@dataclass(frozen=True)
class Settings:
    """Everything that determines the assets' bytes (with this file's source)."""

    variant: str
    seed: int = 1234
    hidden: int = 128
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    max_positions: int = 64
    batch: int = 64
    base_steps: int = 800
    base_lr: float = 2e-3
    base_table_size: int = 50
    base_table_fraction: float = 0.3
    adapter_steps: int = 400
    adapter_lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    lora_r: int = 8
    lora_alpha: int = 16
    facts_table_size: int = 20
    neutral_fraction: float = 0.5
    unknown_keys: int = 2000  # many: neutrality must generalise to keys never seen
    eval_prompts: int = 100
    threads: int = 1  # one thread: no spin-waiting on a shared machine, same bytes on any core count


VARIANTS: dict[str, Settings] = {
    "full": Settings(variant="full"),
    "small": Settings(variant="small", base_steps=650, adapter_steps=220, eval_prompts=50),
}


@dataclass(frozen=True)
class Task:
    """One skill: a prompt prefix, how to make inputs, and the answer for an input."""

    name: str
    adapter: str
    prefix: str
    skill: str
    neutral: bool  # trained with base-behaviour batches so it stays neutral outside its prefix


TASKS: tuple[Task, ...] = (
    Task("facts", "facts", "fact", "knowledge: recalls a memorised table of made-up words", True),
    Task("upper", "upper", "up", "format: upper-cases a lower-case word", True),
    Task("reverse", "reverse", "rev", "format: reverses a word", False),
    Task("sort", "sort", "sort", "format: sorts the letters of a word", False),
)
MERGEABLE_PAIR = ("facts", "upper")
CONFLICTING_PAIR = ("reverse", "sort")


@dataclass
class DemoAssets:
    """Paths of a built asset directory."""

    root: Path
    settings: Settings
    base_dir: Path = field(init=False)
    adapters: dict[str, Path] = field(init=False)
    suite_path: Path = field(init=False)
    inventory_path: Path = field(init=False)
    measurements_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base_dir = self.root / "base"
        self.adapters = {t.adapter: self.root / "adapters" / t.adapter for t in TASKS}
        self.suite_path = self.root / "suite.json"
        self.inventory_path = self.root / "inventory.json"
        self.measurements_path = self.root / "measurements.json"

    def inventory(self) -> dict:
        return json.loads(self.inventory_path.read_text())

    def suite(self) -> dict:
        return json.loads(self.suite_path.read_text())

    def measurements(self) -> dict:
        return json.loads(self.measurements_path.read_text())


# ---------------------------------------------------------------- identity and cache


def asset_hash(settings: Settings) -> str:
    """sha256 over this file's source and the settings: the assets' identity."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- tokenizer


def vocabulary() -> list[str]:
    tokens = SPECIALS + CHARS
    return tokens + [f"<extra_{i}>" for i in range(VOCAB_SIZE - len(tokens))]


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """One token per character (WordLevel over single characters); "\\n" is the end of sequence."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=EOS,
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


TOKEN_ID = {tok: i for i, tok in enumerate(vocabulary())}
PAD_ID = TOKEN_ID["<pad>"]
EOS_ID = TOKEN_ID[EOS]


def encode(text: str) -> list[int]:
    return [TOKEN_ID[c] for c in text]


def decode(ids: Sequence[int]) -> str:
    vocab = vocabulary()
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        out.append(vocab[i] if vocab[i] in CHARS else "")
    return "".join(out)


# ---------------------------------------------------------------- data


def prompt(prefix: str, text: str) -> str:
    """The form every example takes: ``"<prefix>: <input> ="``; the answer follows, ending at "\\n"."""
    return f"{prefix}: {text} ="


def _word(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _random_prefix(rng: random.Random) -> str:
    while True:
        p = _word(rng, LOWER, 2, 4)
        if p not in RESERVED_PREFIXES:
            return p


def _format_input(rng: random.Random) -> str:
    """A lower-case word whose answer differs from a copy and from the other format answers."""
    while True:
        w = _word(rng, LOWER, 3, 6)
        rev, srt = w[::-1], "".join(sorted(w))
        if len({w, rev, srt}) == 3:
            return w


def answer(task: str, text: str, tables: dict[str, dict[str, str]]) -> str:
    if task == "upper":
        return text.upper()
    if task == "reverse":
        return text[::-1]
    if task == "sort":
        return "".join(sorted(text))
    return tables[task][text]


@dataclass(frozen=True)
class World:
    """The deterministic data every stage draws on."""

    base_table: dict[str, str]
    facts_table: dict[str, str]
    unknown_keys: tuple[str, ...]
    eval_inputs: dict[str, tuple[str, ...]]  # task name -> held-out inputs (format tasks)


def make_world(s: Settings) -> World:
    rng = random.Random(s.seed)
    used: set[str] = set()

    def fresh_key() -> str:
        while True:
            k = _word(rng, LOWER, 3, 3)
            if k not in used:
                used.add(k)
                return k

    base_table = {fresh_key(): _word(rng, LOWER, 3, 5) for _ in range(s.base_table_size)}
    facts_table = {fresh_key(): _word(rng, LOWER, 3, 5) for _ in range(s.facts_table_size)}
    unknown = tuple(fresh_key() for _ in range(s.unknown_keys))
    eval_inputs: dict[str, tuple[str, ...]] = {}
    for t in TASKS:
        if t.name == "facts":
            continue
        seen: set[str] = set()
        while len(seen) < s.eval_prompts:
            seen.add(_format_input(rng))
        eval_inputs[t.name] = tuple(sorted(seen))
    return World(base_table, facts_table, unknown, eval_inputs)


Example = tuple[str, str]  # (prompt, answer without the final "\n")


def _copy_example(rng: random.Random) -> Example:
    text = _word(rng, LOWER + UPPER + DIGITS, 1, 8)
    return prompt(_random_prefix(rng), text), text


def _task_example(rng: random.Random, task: Task, world: World) -> Example:
    if task.name == "facts":
        key = rng.choice(sorted(world.facts_table))
        return prompt(task.prefix, key), world.facts_table[key]
    held_out = set(world.eval_inputs[task.name])
    while True:
        w = _format_input(rng)
        if w not in held_out:
            return prompt(task.prefix, w), answer(task.name, w, {})


def batch_tensors(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels on the answer (and its "\\n") only."""
    seqs, labels = [], []
    for p, a in examples:
        pi, ai = encode(p), [*encode(a), EOS_ID]
        seqs.append(pi + ai)
        labels.append([-100] * len(pi) + ai)
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


# ---------------------------------------------------------------- model and LoRA


def model_config(s: Settings):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=False,
        bos_token_id=TOKEN_ID["<s>"],
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) · B A x, with W frozen; A starts Kaiming-uniform and B at zero (as PEFT)."""

    def __init__(self, base: nn.Linear, r: int, alpha: int) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def _module_paths(model) -> list[tuple[str, nn.Module, str]]:
    """(PEFT-style module path, parent module, attribute) for every LoRA target, in a fixed order."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for name in TARGET_MODULES:
            parent, kind = (layer.self_attn, "self_attn") if name in ATTN_MODULES else (layer.mlp, "mlp")
            out.append((f"model.layers.{i}.{kind}.{name}", parent, name))
    return out


def attach_lora(model, r: int, alpha: int) -> dict[str, LoRALinear]:
    for p in model.parameters():
        p.requires_grad_(False)
    loras: dict[str, LoRALinear] = {}
    for path, parent, attr in _module_paths(model):
        lora = LoRALinear(getattr(parent, attr), r, alpha)
        setattr(parent, attr, lora)
        loras[path] = lora
    return loras


def lora_state(loras: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """Tensors under PEFT's key names (``base_model.model.<module>.lora_A.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for path, lora in loras.items():
        out[f"base_model.model.{path}.lora_A.weight"] = lora.lora_A.detach().clone().contiguous()
        out[f"base_model.model.{path}.lora_B.weight"] = lora.lora_B.detach().clone().contiguous()
    return out


def adapter_config(s: Settings) -> dict:
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": BASE_MODEL_NAME,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": s.lora_alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": s.lora_r,
        "rank_pattern": {},
        "target_modules": sorted(TARGET_MODULES),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def merged_model(base, adapters: Sequence[tuple[dict[str, torch.Tensor], float]], s: Settings, space: str):
    """A copy of ``base`` with merged LoRA deltas added to its weights.

    ``delta`` space: W' = W + Σ_i w_i·s·B_i·A_i (the exact sum of task vectors).
    ``factors`` space: W' = W + (Σ_i w_i·s·B_i)(Σ_i w_i·A_i) (A and B merged separately, cross terms
    included), the way LoRAX and PEFT's ``linear`` combine adapters of equal rank.
    """
    model = copy.deepcopy(base)
    scale = s.lora_alpha / s.lora_r
    with torch.no_grad():
        for path, parent, attr in _module_paths(model):
            lin = getattr(parent, attr)
            a = [st[f"base_model.model.{path}.lora_A.weight"] for st, _ in adapters]
            b = [st[f"base_model.model.{path}.lora_B.weight"] for st, _ in adapters]
            w = [wt for _, wt in adapters]
            if space == "delta":
                delta = sum(wi * scale * bi @ ai for wi, ai, bi in zip(w, a, b, strict=True))
            else:
                delta = sum(wi * scale * bi for wi, bi in zip(w, b, strict=True)) @ sum(
                    wi * ai for wi, ai in zip(w, a, strict=True)
                )
            lin.weight += delta
    return model


# ---------------------------------------------------------------- training and evaluation


def _lr_lambda(total: int, warmup_fraction: float) -> Callable[[int], float]:
    warm = max(1, int(total * warmup_fraction))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def train(model, params: list[nn.Parameter], sample: Callable[[], list[Example]], steps: int, lr: float,
          s: Settings, log: Callable[[str], None], label: str) -> float:  # fmt: skip
    """AdamW with linear warm-up and decay; loss on answer tokens only. Returns the final loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, s.warmup_fraction))
    model.train()
    loss_val = float("nan")
    t0 = time.monotonic()
    for step in range(steps):
        out = model(**batch_tensors(sample()))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        loss_val = out.loss.detach().item()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  {label}: step {step + 1}/{steps} loss {loss_val:.4f} ({time.monotonic() - t0:.0f}s)")
    model.eval()
    return loss_val


@torch.no_grad()
def greedy(
    model, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS, chunk: int = 256
) -> list[str]:
    """Greedy completions with transformers' ``generate`` (left-padded batches), cut at "\\n"."""
    model.eval()
    outs: list[str] = []
    for start in range(0, len(prompts), chunk):
        part = [encode(p) for p in prompts[start : start + chunk]]
        width = max(len(x) for x in part)
        ids = torch.full((len(part), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(part):
            ids[i, width - len(x) :] = torch.tensor(x)
            mask[i, width - len(x) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        )
        outs.extend(decode(row[width:].tolist()) for row in gen)
    return outs


def task_prompts(task: Task, world: World) -> list[Example]:
    """The evaluation prompts of a task with their expected answers."""
    if task.name == "facts":
        return [(prompt(task.prefix, k), v) for k, v in sorted(world.facts_table.items())]
    return [(prompt(task.prefix, w), answer(task.name, w, {})) for w in world.eval_inputs[task.name]]


def accuracy(model, examples: Sequence[Example]) -> float:
    got = greedy(model, [p for p, _ in examples])
    return sum(g == a for g, (_, a) in zip(got, examples, strict=True)) / len(examples)


def evaluate_all(model, world: World) -> dict[str, float]:
    return {t.name: round(accuracy(model, task_prompts(t, world)), 4) for t in TASKS}


# ---------------------------------------------------------------- build


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_assets(out: Path, s: Settings, log: Callable[[str], None] = _print) -> DemoAssets:
    """Train the base and the four adapters and write every file into ``out`` (which may exist)."""
    identity = asset_hash(s)  # of the source as it is now, even if the file is edited during the build
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(s.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(out, s, log, identity)
    finally:  # leave the process as it was (tests build in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(out: Path, s: Settings, log: Callable[[str], None], identity: str) -> DemoAssets:
    from transformers import GenerationConfig, LlamaForCausalLM

    t_start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    world = make_world(s)
    log(f"demo assets ({s.variant}): building into {out}")

    # Stage 0: the base model: copying under random prefixes plus its own lookup table.
    torch.manual_seed(s.seed)
    base = LlamaForCausalLM(model_config(s))
    base_rng = random.Random(s.seed + 1)
    base_keys = sorted(world.base_table)

    def base_batch() -> list[Example]:
        ex = []
        for _ in range(s.batch):
            if base_rng.random() < s.base_table_fraction:
                k = base_rng.choice(base_keys)
                ex.append((prompt("fact", k), world.base_table[k]))
            else:
                ex.append(_copy_example(base_rng))
        return ex

    train(base, list(base.parameters()), base_batch, s.base_steps, s.base_lr, s, log, "base")
    base_dir = out / "base"
    base.generation_config = GenerationConfig(
        bos_token_id=TOKEN_ID["<s>"], eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    base.save_pretrained(base_dir, safe_serialization=True)
    build_tokenizer().save_pretrained(base_dir)
    # Base behaviour the neutral adapters learn to keep: its greedy answers for keys it never saw.
    unknown_prompts = [prompt("fact", k) for k in world.unknown_keys]
    unknown_answers = dict(zip(unknown_prompts, greedy(base, unknown_prompts), strict=True))
    base_table_acc = accuracy(base, [(prompt("fact", k), v) for k, v in world.base_table.items()])
    log(f"  base: own table {base_table_acc:.0%}")

    # Stages 1..4: one adapter per task.
    states: dict[str, dict[str, torch.Tensor]] = {}
    for stage, task in enumerate(TASKS, start=1):
        torch.manual_seed(s.seed + 100 * stage)
        rng = random.Random(s.seed + 100 * stage + 1)
        model = copy.deepcopy(base)
        loras = attach_lora(model, s.lora_r, s.lora_alpha)
        params = [p for m in loras.values() for p in (m.lora_A, m.lora_B)]

        def neutral_example(rng: random.Random = rng) -> Example:
            kind = rng.randrange(3)
            if kind == 0:
                return _copy_example(rng)
            if kind == 1:
                k = rng.choice(base_keys)
                return prompt("fact", k), world.base_table[k]
            p = rng.choice(unknown_prompts)
            return p, unknown_answers[p]

        def adapter_batch(task: Task = task, rng: random.Random = rng) -> list[Example]:
            n_neutral = int(s.batch * s.neutral_fraction) if task.neutral else 0
            own = [_task_example(rng, task, world) for _ in range(s.batch - n_neutral)]
            return own + [neutral_example() for _ in range(n_neutral)]

        train(model, params, adapter_batch, s.adapter_steps, s.adapter_lr, s, log, task.adapter)
        states[task.adapter] = lora_state(loras)
        adir = out / "adapters" / task.adapter
        adir.mkdir(parents=True, exist_ok=True)
        save_file(states[task.adapter], str(adir / "adapter_model.safetensors"), metadata={"format": "pt"})
        _write_json(adir / "adapter_config.json", adapter_config(s))

    # Measurements: every single adapter on every task, then the two pairs merged.
    log("  measuring (transformers greedy decoding)")
    singles: dict[str, dict[str, float]] = {"base": evaluate_all(base, world)}
    for name, st in states.items():
        singles[name] = evaluate_all(merged_model(base, [(st, 1.0)], s, "delta"), world)
    merges: list[dict] = []
    plan = [(MERGEABLE_PAIR, "delta", w) for w in ((1.0, 1.0), (1.2, 1.0), (1.0, 0.8), (0.5, 0.5))]
    plan += [(MERGEABLE_PAIR, "factors", (1.0, 1.0))]
    plan += [(CONFLICTING_PAIR, space, (1.0, 1.0)) for space in ("delta", "factors")]
    for pair, space, w in plan:
        m = merged_model(base, [(states[pair[0]], w[0]), (states[pair[1]], w[1])], s, space)
        scores = {t: round(accuracy(m, task_prompts(_task(t), world)), 4) for t in pair}
        merges.append({"adapters": list(pair), "weights": list(w), "space": space, "scores": scores})
    measurements = {
        "base_own_table": round(base_table_acc, 4),
        "single": singles,
        "merged": merges,
        "note": "exact-match accuracy, transformers greedy decoding; merged = weights added to the base",
    }
    _write_json(out / "measurements.json", measurements)
    _write_json(out / "suite.json", make_suite(world))
    _write_json(out / "inventory.json", make_inventory(s, base))
    _write_json(out / STAMP_FILE, {"hash": identity, "settings": asdict(s)})
    log(_summary(measurements))
    log(f"demo assets ({s.variant}): built in {time.monotonic() - t_start:.0f}s")
    return DemoAssets(out, s)


def _task(name: str) -> Task:
    return next(t for t in TASKS if t.name == name)


def make_suite(world: World) -> dict:
    return {
        "name": "loramerge-demo",
        "description": "Exact-match tasks, one per demo adapter; greedy decoding; an answer ends at "
        "a newline.",
        "sampling": {"max_tokens": MAX_NEW_TOKENS, "temperature": 0.0},
        "tasks": [
            {
                "name": t.name,
                "adapter": t.adapter,
                "skill": t.skill,
                "scorer": "exact",
                "prompts": [{"prompt": p, "expected": a} for p, a in task_prompts(t, world)],
            }
            for t in TASKS
        ],
    }


def make_inventory(s: Settings, base) -> dict:
    n_params = sum(p.numel() for p in base.parameters())
    return {
        "base_model": {
            "name": BASE_MODEL_NAME,
            "path": "base",
            "architecture": "LlamaForCausalLM",
            "parameters": n_params,
            "hidden_size": s.hidden,
            "intermediate_size": s.intermediate,
            "layers": s.layers,
            "heads": s.heads,
            "vocab_size": VOCAB_SIZE,
            "tokenizer": "one token per character; newline ends a sequence",
            "skill": "copies a word under any prefix; recalls its own table under 'fact:'",
        },
        "adapters": [
            {
                "name": t.adapter,
                "path": f"adapters/{t.adapter}",
                "task": t.name,
                "skill": t.skill,
                "example": f"{prompt(t.prefix, '...')}",
                "rank": s.lora_r,
                "alpha": s.lora_alpha,
                "target_modules": sorted(TARGET_MODULES),
                "base_model": BASE_MODEL_NAME,
                "neutral_training": t.neutral,
            }
            for t in TASKS
        ],
        "mergeable_pair": list(MERGEABLE_PAIR),
        "conflicting_pair": list(CONFLICTING_PAIR),
        "variant": s.variant,
    }


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _summary(m: dict) -> str:
    names = [t.name for t in TASKS]
    lines = ["  " + "model".ljust(10) + "".join(n.rjust(9) for n in names)]
    for model_name, scores in m["single"].items():
        lines.append("  " + model_name.ljust(10) + "".join(f"{scores[n]:9.0%}" for n in names))
    for row in m["merged"]:
        label = "+".join(f"{a}:{w:g}" for a, w in zip(row["adapters"], row["weights"], strict=True))
        cells = " ".join(f"{k}={v:.0%}" for k, v in row["scores"].items())
        lines.append(f"  merged {label} [{row['space']}]: {cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.assets", description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="full")
    ap.add_argument("--out", type=Path, help="asset directory (default: a cache directory named by hash)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--seed", type=int, help="override the variant's seed")
    args = ap.parse_args(argv)
    from demo.cache import default_dir, ensure_assets

    settings = VARIANTS[args.variant]
    if args.seed is not None:
        settings = replace(settings, seed=args.seed)
    out = args.out or default_dir(settings)
    if args.force and out.exists():
        shutil.rmtree(out)
    assets = ensure_assets(settings, out)
    print(assets.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
