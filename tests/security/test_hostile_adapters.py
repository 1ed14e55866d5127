"""Hostile adapters: each is refused with the right status and a message naming the adapter and the
reason, and nothing is returned. The path under test is the service's own: SourceResolver.resolve,
then load_adapter.

Most files here are written by hand (json + struct) so that they can be wrong in exactly one way.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loramerge.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoramergeError,
    NotFound,
    ResourceExhausted,
)
from loramerge.peft import CONFIG_FILE, WEIGHTS_FILE
from merge_service.adapter import LoraAdapter, load_adapter, read_config
from merge_service.sources import SourceResolver
from merge_service.sources.base import PICKLED_WEIGHTS_FILE, ResolvedSource
from merge_service.spec import AdapterRef, SourceKind

FIELD = "spec.adapters[0].id"
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
D = 16


def _config(**overrides: object) -> dict:
    cfg = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "base_model_name_or_path": "tiny/base",
    }
    cfg.update(overrides)
    return cfg


def _tensors(r: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for m in MODULES:
        out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, D, generator=gen)
        out[f"base_model.model.{m}.lora_B.weight"] = torch.randn(D, r, generator=gen)
    return out


def write(d: Path, config: dict | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).write_text(json.dumps(_config() if config is None else config))
    save_file(_tensors() if tensors is None else tensors, d / WEIGHTS_FILE, metadata={"format": "pt"})
    return d


def raw_safetensors(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


def attempt(
    root: Path, adapter_id: str, source: SourceKind = SourceKind.AUTO, **resolver_kwargs: object
) -> LoramergeError:
    """Resolve and load as the service does; return the domain error (failing if there is none)."""
    resolver = SourceResolver(root, **resolver_kwargs)
    with pytest.raises(LoramergeError) as info:
        resolved = resolver.resolve(AdapterRef(adapter_id, source=source), field=FIELD)
        load_adapter(resolved, field=FIELD)
    err = info.value
    assert repr(adapter_id) in err.message, err.message
    assert err.field == FIELD
    return err


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """An id that falls through to the hub must not reach the network from these tests."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "adapters"
    write(r / "good")
    return r


def test_the_baseline_adapter_loads(root: Path) -> None:
    resolved = SourceResolver(root).resolve(AdapterRef("good"))
    adapter = load_adapter(resolved)
    assert isinstance(adapter, LoraAdapter) and sorted(adapter.modules) == sorted(MODULES)


# ------------------------------------------------------------------------------- weights file


def _truncate_half(d: Path) -> None:
    w = d / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _truncate_to_prefix(d: Path) -> None:
    (d / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00")


def _garbage(d: Path) -> None:
    (d / WEIGHTS_FILE).write_bytes(bytes(range(256)) * 8)


def _header_claims_gigabytes(d: Path) -> None:
    (d / WEIGHTS_FILE).write_bytes(raw_safetensors({}, header_len=8 << 30))


def _tensor_claims_gigabytes(d: Path) -> None:
    key = f"base_model.model.{MODULES[0]}.lora_A.weight"
    header = {key: {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 65536 * 65536 * 4]}}
    (d / WEIGHTS_FILE).write_bytes(raw_safetensors(header, b"\0" * 64))


def _header_not_json(d: Path) -> None:
    (d / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 12) + b"{not json!!}")


def _offsets_overlap(d: Path) -> None:
    a, b = (f"base_model.model.{MODULES[0]}.lora_{w}.weight" for w in "AB")
    header = {
        a: {"dtype": "F32", "shape": [2, D], "data_offsets": [0, 8 * D]},
        b: {"dtype": "F32", "shape": [D, 2], "data_offsets": [4 * D, 12 * D]},
    }
    (d / WEIGHTS_FILE).write_bytes(raw_safetensors(header, b"\0" * 12 * D))


def _offsets_mismatch_shape(d: Path) -> None:
    a = f"base_model.model.{MODULES[0]}.lora_A.weight"
    header = {a: {"dtype": "F32", "shape": [2, D], "data_offsets": [0, 16]}}
    (d / WEIGHTS_FILE).write_bytes(raw_safetensors(header, b"\0" * 16))


def _duplicate_header_key(d: Path) -> None:
    a = f"base_model.model.{MODULES[0]}.lora_A.weight"
    entry = json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    h = f'{{"{a}": {entry}, "{a}": {entry}}}'.encode()
    (d / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)


def _integer_dtype(d: Path) -> None:
    t = _tensors()
    t[f"base_model.model.{MODULES[0]}.lora_A.weight"] = torch.ones(2, D, dtype=torch.int64)
    save_file(t, d / WEIGHTS_FILE)


def _with_value(value: float) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        t = _tensors()
        t[f"base_model.model.{MODULES[1]}.lora_B.weight"][3, 1] = value
        save_file(t, d / WEIGHTS_FILE)

    return build


def _f64_overflows_f32(d: Path) -> None:
    t = {k: v.double() for k, v in _tensors().items()}
    t[f"base_model.model.{MODULES[0]}.lora_A.weight"][0, 0] = 1e300
    save_file(t, d / WEIGHTS_FILE)


def _ranks_disagree(d: Path) -> None:
    t = _tensors()
    t[f"base_model.model.{MODULES[0]}.lora_B.weight"] = torch.randn(D, 3)
    save_file(t, d / WEIGHTS_FILE)


def _three_dims(d: Path) -> None:
    t = _tensors()
    t[f"base_model.model.{MODULES[0]}.lora_A.weight"] = torch.randn(2, D, 1)
    save_file(t, d / WEIGHTS_FILE)


def _missing_b(d: Path) -> None:
    t = _tensors()
    del t[f"base_model.model.{MODULES[1]}.lora_B.weight"]
    save_file(t, d / WEIGHTS_FILE)


def _no_tensors(d: Path) -> None:
    save_file({}, d / WEIGHTS_FILE)


def _unexpected_tensor(d: Path) -> None:
    save_file({**_tensors(), "base_model.model.lm_head.weight": torch.zeros(4, D)}, d / WEIGHTS_FILE)


def _named_adapter_keys(d: Path) -> None:
    save_file({k.replace(".weight", ".default.weight"): v for k, v in _tensors().items()}, d / WEIGHTS_FILE)


def _untargeted_module(d: Path) -> None:
    t = _tensors()
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.randn(2, D)
    t["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.randn(D, 2)
    save_file(t, d / WEIGHTS_FILE)


def _config_rank(d: Path, **cfg: object) -> None:
    (d / CONFIG_FILE).write_text(json.dumps(_config(**cfg)))


def _extra_tensor(name: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        save_file({**_tensors(), name: torch.ones(shape)}, d / WEIGHTS_FILE)

    return build


WEIGHT_CASES: dict[str, tuple[Callable[[Path], None], type[LoramergeError], str]] = {
    "truncated": (_truncate_half, InvalidArgument, "truncated|cover"),
    "truncated_prefix": (_truncate_to_prefix, InvalidArgument, "too short"),
    "garbage": (_garbage, InvalidArgument, "header claims"),
    "header_claims_gigabytes": (_header_claims_gigabytes, InvalidArgument, "header claims 8589934592 bytes"),
    "tensor_claims_gigabytes": (_tensor_claims_gigabytes, InvalidArgument, "cover 17179869184 data bytes"),
    "header_not_json": (_header_not_json, InvalidArgument, "not valid JSON"),
    "duplicate_header_key": (_duplicate_header_key, InvalidArgument, "duplicate key"),
    "offsets_overlap": (_offsets_overlap, InvalidArgument, "overlaps"),
    "offsets_disagree_with_shape": (_offsets_mismatch_shape, InvalidArgument, "needs 128 bytes"),
    "integer_dtype": (_integer_dtype, InvalidArgument, "dtype 'I64'"),
    "nan": (_with_value(float("nan")), InvalidArgument, r"v_proj\.lora_B\.weight' has 1 non-finite"),
    "inf": (_with_value(float("-inf")), InvalidArgument, r"v_proj\.lora_B\.weight' has 1 non-finite"),
    "f64_overflows_f32": (_f64_overflows_f32, InvalidArgument, "non-finite"),
    "ranks_of_a_and_b_disagree": (_ranks_disagree, InvalidArgument, r"q_proj'.*rank 2.*\[16, 3\]"),
    "three_dimensional_factor": (_three_dims, InvalidArgument, "must be non-empty matrices"),
    "missing_lora_b": (_missing_b, InvalidArgument, "v_proj' has lora_A but no lora_B"),
    "no_tensors": (_no_tensors, InvalidArgument, "no LoRA tensors"),
    "unexpected_tensor": (_unexpected_tensor, InvalidArgument, "unexpected tensor 'base_model.model.lm_head"),
    "adapter_named_keys": (_named_adapter_keys, InvalidArgument, "unexpected tensor"),
    "module_outside_target_modules": (_untargeted_module, InvalidArgument, "up_proj' is not among"),
    "config_claims_higher_rank": (lambda d: _config_rank(d, r=4), InvalidArgument, "config gives rank 4"),
    "config_claims_lower_rank": (lambda d: _config_rank(d, r=1), InvalidArgument, "config gives rank 1"),
    "rank_pattern_lies": (
        lambda d: _config_rank(d, rank_pattern={"v_proj": 8}),
        InvalidArgument,
        "v_proj': the config gives rank 8",
    ),
    "dora_tensors": (
        _extra_tensor(f"base_model.model.{MODULES[0]}.lora_magnitude_vector", (D,)),
        FailedPrecondition,
        "DoRA",
    ),
    "lora_bias_tensor": (
        _extra_tensor(f"base_model.model.{MODULES[0]}.lora_B.bias", (D,)),
        FailedPrecondition,
        "LoRA bias",
    ),
    "modules_to_save_tensor": (
        _extra_tensor("base_model.model.score.modules_to_save.weight", (2, D)),
        FailedPrecondition,
        "modules_to_save",
    ),
    "embedding_lora": (
        _extra_tensor("base_model.model.model.embed_tokens.lora_embedding_A", (2, 32)),
        FailedPrecondition,
        "embedding-layer LoRA",
    ),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_hostile_weights_are_refused(root: Path, case: str) -> None:
    build, cls, reason = WEIGHT_CASES[case]
    build(write(root / case))
    err = attempt(root, case)
    assert type(err) is cls, err.message
    assert re.search(reason, err.message), err.message


# -------------------------------------------------------------------------------- config file


CONFIG_CASES: dict[str, tuple[object, type[LoramergeError], str]] = {
    "not_json": ("{r: 8", InvalidArgument, "not valid JSON"),
    "not_an_object": ([1, 2], InvalidArgument, "expected a JSON object"),
    "duplicate_keys": (
        '{"r": 2, "r": 64, "target_modules": ["q_proj"]}',
        InvalidArgument,
        "duplicate key 'r'",
    ),
    "rank_zero": (_config(r=0), InvalidArgument, "r must be a positive integer, got 0"),
    "rank_string": (_config(r="2"), InvalidArgument, "r must be a positive integer, got '2'"),
    "alpha_nan": ('{"r": 2, "lora_alpha": NaN, "target_modules": ["q_proj"]}', InvalidArgument, "lora_alpha"),
    "bad_rank_pattern": (_config(rank_pattern={"q_proj": -1}), InvalidArgument, "rank_pattern"),
    "bad_pattern_regex": (_config(alpha_pattern={"(": 2}), InvalidArgument, "not a valid pattern"),
    "no_target_modules": (_config(target_modules=None), InvalidArgument, "target_modules"),
    "dora": (_config(use_dora=True), FailedPrecondition, "DoRA"),
    "bias_all": (_config(bias="all"), FailedPrecondition, "bias='all'"),
    "lora_bias": (_config(lora_bias=True), FailedPrecondition, "LoRA bias"),
    "modules_to_save": (_config(modules_to_save=["score"]), FailedPrecondition, "modules_to_save"),
    "not_lora": (_config(peft_type="IA3"), FailedPrecondition, "peft_type is 'IA3'"),
    "huge_config": (" " * (2 << 20) + "{}", InvalidArgument, "more than the 1048576 allowed"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_hostile_configs_are_refused(root: Path, case: str) -> None:
    content, cls, reason = CONFIG_CASES[case]
    d = write(root / case)
    (d / CONFIG_FILE).write_text(content if isinstance(content, str) else json.dumps(content))
    err = attempt(root, case)
    assert type(err) is cls, err.message
    assert reason in err.message or re.search(reason, err.message), err.message


# --------------------------------------------------------------------------------- pickled .bin


class _Payload:
    """Unpickling this creates ``marker``: the proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.usefixtures("no_unpickling")
def test_pickled_bin_only_is_refused_and_never_unpickled(root: Path, tmp_path: Path) -> None:
    d = root / "pickled"
    d.mkdir()
    (d / CONFIG_FILE).write_text(json.dumps(_config()))
    marker = tmp_path / "unpickled"
    (d / PICKLED_WEIGHTS_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    err = attempt(root, "pickled")
    assert isinstance(err, FailedPrecondition)
    assert "adapter_model.bin" in err.message and "never loaded" in err.message
    # load_adapter on its own refuses it the same way.
    with pytest.raises(FailedPrecondition, match=r"adapter_model\.bin"):
        load_adapter(ResolvedSource("pickled", SourceKind.LOCAL, "", "x", d))
    assert not marker.exists()


@pytest.mark.usefixtures("no_unpickling")
def test_bin_beside_safetensors_is_ignored(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (root / "good" / PICKLED_WEIGHTS_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    adapter = load_adapter(SourceResolver(root).resolve(AdapterRef("good")))
    assert len(adapter.modules) == 2 and not marker.exists()


# ------------------------------------------------------------------------------------- paths


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    return write(tmp_path / "outside" / "secret")


@pytest.mark.parametrize(
    ("adapter_id", "reason"),
    [
        ("../outside/secret", r"must not contain '\.\.'"),
        ("good/../../outside/secret", r"must not contain '\.\.'"),
        ("good/..", r"must not contain '\.\.'"),
        ("/etc", "not absolute paths"),
        ("//etc/passwd", "not absolute paths"),
        ("~root", "not absolute paths"),
    ],
)
@pytest.mark.usefixtures("outside")
def test_ids_that_climb_out_are_refused(root: Path, adapter_id: str, reason: str) -> None:
    err = attempt(root, adapter_id)
    assert isinstance(err, InvalidArgument)
    assert re.search(reason, err.message), err.message


def test_absolute_path_inside_the_root_is_refused_too(root: Path) -> None:
    err = attempt(root, str(root / "good"))
    assert isinstance(err, InvalidArgument) and "not absolute paths" in err.message


def test_symlinked_directory_leaving_the_root(root: Path, outside: Path) -> None:
    (root / "link").symlink_to(outside, target_is_directory=True)
    err = attempt(root, "link")
    assert isinstance(err, InvalidArgument) and "outside the adapter root" in err.message


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_symlinked_file_leaving_the_root(root: Path, outside: Path, name: str) -> None:
    d = write(root / "half-link")
    (d / name).unlink()
    (d / name).symlink_to(outside / name)
    err = attempt(root, "half-link")
    assert isinstance(err, InvalidArgument) and f"{name} resolves to a path outside" in err.message


def test_symlinks_inside_the_root_are_fine(root: Path) -> None:
    (root / "alias").symlink_to(root / "good", target_is_directory=True)
    resolver = SourceResolver(root)
    alias, good = resolver.resolve(AdapterRef("alias")), resolver.resolve(AdapterRef("good"))
    assert alias.digest == good.digest
    assert len(load_adapter(alias).modules) == 2


def test_dangling_and_missing(root: Path, tmp_path: Path) -> None:
    (root / "dangling").symlink_to(root / "nowhere")
    assert isinstance(attempt(root, "dangling"), NotFound)
    assert isinstance(attempt(root, "never-written", source=SourceKind.LOCAL), NotFound)
    d = root / "no-weights"
    d.mkdir()
    (d / CONFIG_FILE).write_text(json.dumps(_config()))
    err = attempt(root, "no-weights")
    assert isinstance(err, NotFound) and WEIGHTS_FILE in err.message


@pytest.mark.timeout(20)
def test_fifo_and_directory_in_place_of_files(root: Path) -> None:
    d = write(root / "fifo")
    (d / WEIGHTS_FILE).unlink()
    os.mkfifo(d / WEIGHTS_FILE)  # reading it would block forever
    err = attempt(root, "fifo")
    assert isinstance(err, InvalidArgument) and "not a regular file" in err.message
    # load_adapter refuses it on its own too, without blocking on the open.
    with pytest.raises(InvalidArgument, match="not a regular file"):
        load_adapter(ResolvedSource("fifo", SourceKind.LOCAL, "", "x", d))
    os.mkfifo(root / "fifo-config")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        read_config(root / "fifo-config", "fifo")
    d = write(root / "dir")
    (d / CONFIG_FILE).unlink()
    (d / CONFIG_FILE).mkdir()
    err = attempt(root, "dir")
    assert isinstance(err, InvalidArgument) and "not a regular file" in err.message


# ------------------------------------------------------------------------------------ byte limit


def test_byte_limit_is_checked_from_sizes_before_reading(root: Path) -> None:
    d = write(root / "huge")
    with open(d / WEIGHTS_FILE, "r+b") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB by size, nothing on disk
    resolver = SourceResolver(root, max_adapter_bytes=1 << 20)
    with pytest.raises(ResourceExhausted, match=r"'huge'.*more than the 1048576 allowed") as info:
        resolver.resolve(AdapterRef("huge"), field=FIELD)
    assert info.value.field == FIELD
    local = resolver.source(resolver.detect(AdapterRef("huge")))
    assert local.digests.hashed_bytes == 0  # not one byte was read
    # The limit counts both files.
    good = root / "good"
    both = sum((good / n).stat().st_size for n in (CONFIG_FILE, WEIGHTS_FILE))
    assert SourceResolver(root, max_adapter_bytes=both).resolve(AdapterRef("good")).nbytes == both
    assert isinstance(attempt(root, "good", max_adapter_bytes=both - 1), ResourceExhausted)


def test_load_adapter_enforces_the_limit_itself(root: Path) -> None:
    resolved = SourceResolver(root).resolve(AdapterRef("good"))
    with pytest.raises(ResourceExhausted, match="'good'"):
        load_adapter(resolved, max_bytes=resolved.nbytes - 1)
    assert load_adapter(resolved, max_bytes=resolved.nbytes).digest == resolved.digest


def test_weights_swapped_after_resolve_are_still_checked(root: Path) -> None:
    """The digest is taken at resolve time; load_adapter re-validates whatever it actually reads."""
    resolved = SourceResolver(root).resolve(AdapterRef("good"))
    _with_value(float("nan"))(root / "good")
    with pytest.raises(InvalidArgument, match="non-finite"):
        load_adapter(resolved)


def test_copy_of_a_real_peft_adapter_passes(root: Path, adapter_root: Path) -> None:
    shutil.copytree(adapter_root / "c", root / "peft-c")
    adapter = load_adapter(SourceResolver(root).resolve(AdapterRef("peft-c")))
    assert adapter.config.use_rslora and len(adapter.modules) == 14
