"""Turn a request's adapter choice into the MergeSpec sent to the merge service, and name it.

A spec's fingerprint (sha256 of its normalised, deterministic encoding) lets a repeated request
find its loaded adapter without asking the merge service. The merge key itself (content digests of
the sources) is only known to the merge service; different spellings of one merge get different
fingerprints but the same merge key, so they still share one loaded adapter.
"""

from __future__ import annotations

import hashlib
import re

from loramerge.errors import InvalidArgument, shown
from loramerge.v1 import merge_pb2

_STRATEGY = merge_pb2.MergeStrategy
_SOURCE = merge_pb2.AdapterSource
_HUB_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SINGLE_FIELDS = {
    "id": "adapter_id",
    "source": "adapter_source",
    "revision": "adapter_revision",
    "weight": "adapter_weight",
}


def single_adapter_spec(
    adapter_id: str, source: int, revision: str, weight: float | None
) -> merge_pb2.MergeSpec:
    """One adapter at ``weight`` (default 1.0): the merge service scales its B factors."""
    ref = merge_pb2.AdapterRef(id=adapter_id, source=source, revision=revision)
    if weight is not None:
        ref.weight = weight
    return merge_pb2.MergeSpec(adapters=[ref], merge_strategy=_STRATEGY.LINEAR)


def single_adapter_field(field: str) -> str:
    """Name the single-adapter request field for a merge-service field ("spec.adapters[0].weight")."""
    if field.startswith("spec.adapters[0]."):
        return _SINGLE_FIELDS.get(field.rsplit(".", 1)[-1], "adapter_id")
    return "adapter_id"


def merged_spec_field(field: str) -> str:
    """ "spec.density" -> "merged_adapters.density"."""
    if field == "spec" or field.startswith("spec."):
        return "merged_adapters" + field[len("spec") :]
    return field or "merged_adapters"


def normalize_spec(spec: merge_pb2.MergeSpec, engine_max_rank: int) -> merge_pb2.MergeSpec:
    """A copy with defaults made explicit (so equal meanings encode equally) and max_rank capped
    at the engine's: LoRAX-style ids/weights become adapters, unset weights 1.0, unspecified enums
    their documented defaults."""
    out = merge_pb2.MergeSpec()
    out.CopyFrom(spec)
    if out.ids:
        if out.adapters:
            raise InvalidArgument(
                "merged_adapters: give adapters or ids/weights, not both "
                f"(got {len(out.adapters)} adapters and {len(out.ids)} ids)",
                field="merged_adapters.ids",
            )
        if out.weights and len(out.weights) != len(out.ids):
            raise InvalidArgument(
                f"merged_adapters.weights must hold one weight per id ({len(out.ids)}), "
                f"got {len(out.weights)}",
                field="merged_adapters.weights",
            )
        for i, adapter_id in enumerate(out.ids):
            ref = out.adapters.add(id=adapter_id)
            if out.weights:
                ref.weight = out.weights[i]
        del out.ids[:]
        del out.weights[:]
    elif out.weights:
        raise InvalidArgument(
            f"merged_adapters.weights given without ids ({len(out.weights)} weights)",
            field="merged_adapters.weights",
        )
    if not out.adapters:
        raise InvalidArgument(
            "merged_adapters must name at least one adapter, got none", field="merged_adapters.adapters"
        )
    for ref in out.adapters:
        if not ref.HasField("weight"):
            ref.weight = 1.0
    if out.merge_strategy == _STRATEGY.MERGE_STRATEGY_UNSPECIFIED:
        out.merge_strategy = _STRATEGY.LINEAR
    if out.majority_sign_method == merge_pb2.MajoritySignMethod.MAJORITY_SIGN_METHOD_UNSPECIFIED:
        out.majority_sign_method = merge_pb2.MajoritySignMethod.TOTAL
    if out.space == merge_pb2.MergeSpace.MERGE_SPACE_UNSPECIFIED:
        out.space = merge_pb2.MergeSpace.DELTA
    if out.dtype == merge_pb2.Dtype.DTYPE_UNSPECIFIED:
        out.dtype = merge_pb2.Dtype.FLOAT32
    out.max_rank = min(out.max_rank or engine_max_rank, engine_max_rank)
    return out


def spec_fingerprint(spec: merge_pb2.MergeSpec) -> str:
    """sha256 of the deterministic encoding of a normalised spec."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


def ref_pinned(ref: merge_pb2.AdapterRef) -> bool:
    """Whether ``ref`` names content that cannot change: a hub commit sha, or an S3 revision (object
    versions or ETags, as Plan reports them: the merge service serves exactly those or fails).

    A branch, a tag, the default branch, an unpinned S3 prefix and a local folder can all change.
    An inline ``id@sha`` counts only with source HUB: without it, the id might name a local folder.
    """
    s3 = ref.source == _SOURCE.S3 or (
        ref.source == _SOURCE.ADAPTER_SOURCE_UNSPECIFIED and ref.id.startswith("s3://")
    )
    if s3:
        return bool(ref.revision.strip())
    if ref.source == _SOURCE.LOCAL:
        return False
    revision = ref.revision
    if not revision and ref.source == _SOURCE.HUB:
        revision = ref.id.partition("@")[2]
    return bool(_HUB_COMMIT.match(revision))


def spec_pinned(spec: merge_pb2.MergeSpec) -> bool:
    """Whether every adapter of a normalised spec names fixed content (its merge key cannot change)."""
    return bool(spec.adapters) and all(ref_pinned(ref) for ref in spec.adapters)


def describe_spec(spec: merge_pb2.MergeSpec) -> str:
    """A short human summary: "a:0.6+b:0.4 ties d=0.7" (long ids cut, see ``shown``)."""
    parts = "+".join(
        f"{shown(ref.id, 60, quote=False)}:{ref.weight:g}"
        if ref.HasField("weight")
        else shown(ref.id, 60, quote=False)
        for ref in spec.adapters
    )
    strategy = _STRATEGY.Name(spec.merge_strategy or _STRATEGY.LINEAR).lower()
    text = f"{parts} {strategy}"
    if spec.HasField("density"):
        text += f" d={spec.density:g}"
    if spec.space == merge_pb2.MergeSpace.FACTORS:
        text += " factors"
    if spec.target_rank:
        text += f" r={spec.target_rank}"
    return text
