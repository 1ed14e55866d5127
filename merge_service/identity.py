"""The identity of a merge: a canonical encoding of everything that decides the output bytes.

merge key = sha256(canonical JSON) over: the algorithm version; each adapter's content digest with its
weight, sorted; the strategy and only the parameters it reads (density, sign method, seed); the space;
the resolved output rank; the output dtype. Same key ⇒ byte-identical output (on one kind of device).

Weights and density travel as float32 on the wire, so they are rounded to float32 here and encoded
exactly (``float.hex``): the CLI (float64) and a gRPC client asking for 0.1 get the same key.

When a random strategy is asked for without a seed, the seed is derived from the canonical encoding
without it, so the same request always draws the same masks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from merge_service import strategies
from merge_service.spec import MergeSpec, f32

__all__ = ["ALGORITHM_VERSION", "canonical", "derived_seed", "encode", "f32", "merge_key"]

# Bump whenever a change in the math or the output format changes the bytes for the same request.
ALGORITHM_VERSION = 4


def canonical(spec: MergeSpec, digests: Sequence[str], rank: int, *, with_seed: bool = True) -> dict:
    """The canonical description of a merge (JSON-able). ``digests[i]`` belongs to ``spec.adapters[i]``."""
    if len(digests) != len(spec.adapters):
        raise ValueError(f"{len(digests)} digests for {len(spec.adapters)} adapters")
    strategy = strategies.get(spec.strategy)
    doc: dict = {
        "algorithm_version": ALGORITHM_VERSION,
        "adapters": sorted([d, f32(a.weight).hex()] for d, a in zip(digests, spec.adapters, strict=True)),
        "strategy": strategy.name,
        "space": str(spec.space),
        "rank": int(rank),
        "dtype": str(spec.dtype),
    }
    if strategy.uses_density:
        doc["density"] = f32(spec.density if spec.density is not None else 1.0).hex()
    if strategy.uses_sign_method:
        doc["sign_method"] = str(spec.sign_method)
    if strategy.random and with_seed:
        doc["seed"] = int(spec.seed) if spec.seed is not None else None
    return doc


def encode(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def derived_seed(spec: MergeSpec, digests: Sequence[str], rank: int) -> int:
    """A 63-bit seed from the request without its seed (used when a random strategy gets none)."""
    digest = hashlib.sha256(b"seed\x00" + encode(canonical(spec, digests, rank, with_seed=False))).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def merge_key(spec: MergeSpec, digests: Sequence[str], rank: int) -> str:
    """Hex sha256 of the canonical encoding. ``spec.seed`` must already be filled in for random strategies."""
    return hashlib.sha256(encode(canonical(spec, digests, rank))).hexdigest()
