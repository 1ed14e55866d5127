"""Error messages quote bad values cut to a bounded length (``shown``), still naming field and value.

A request may carry an adapter id, revision or merge key of many kilobytes; a message quoting it whole
echoed the request back (escaped, up to ten times its size).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_service.request_specs import describe_spec
from loramerge.errors import SHOWN_CHARS, LoramergeError, shown
from loramerge.v1 import merge_pb2
from merge_service.convert import spec_from_proto
from merge_service.pipeline import Merger
from merge_service.sources import SourceResolver
from merge_service.spec import AdapterRef, MergeSpec

LONG = "x" * 5000
BOUND = 400  # a message with one long value quoted: the text around it plus SHOWN_CHARS and the length


def test_shown_cuts_long_values_and_says_how_long_they_were() -> None:
    assert shown("ab") == "'ab'"
    assert shown(1.5) == "1.5"
    assert shown("ab", quote=False) == "ab"
    cut = shown(LONG)
    assert cut == "'" + "x" * (SHOWN_CHARS - 1) + "…(5000 chars)"
    assert shown(LONG, 10, quote=False) == "x" * 10 + "…(5000 chars)"
    assert shown(b"\x00" * 100, 20).endswith("…(100 bytes)")
    assert shown(list(range(1000))).endswith(f"…({len(repr(list(range(1000))))} chars)")
    assert len(shown("\U0004f7d6" * 1000)) <= SHOWN_CHARS + 20  # escapes are cut too


@pytest.mark.parametrize(
    ("ref", "field"),
    [
        (AdapterRef(LONG), "spec.adapters[0]"),  # no such local adapter, not a hub id either
        (AdapterRef("../" + LONG), "spec.adapters[0]"),
        (AdapterRef("s3://" + LONG), "spec.adapters[0]"),
        (AdapterRef("a", revision=LONG), "spec.adapters[0]"),
        (AdapterRef(" " * 5000), "spec.adapters[0].id"),
    ],
)
def test_adapter_errors_quote_a_cut_value(adapter_root: Path, ref: AdapterRef, field: str) -> None:
    merger = Merger(SourceResolver(adapter_root, hub_endpoint="http://127.0.0.1:9"), device="cpu")
    with pytest.raises(LoramergeError) as info:
        merger.plan(MergeSpec(adapters=(ref,)))
    err = info.value
    assert len(err.message) <= BOUND, err.message
    assert err.field is not None and err.field.startswith(field)
    assert "chars)" in err.message  # the quotation says how long the value was


def test_proto_conversion_quotes_a_cut_id() -> None:
    msg = merge_pb2.MergeSpec(ids=["a", "\t" * 5000])
    with pytest.raises(LoramergeError) as info:
        spec_from_proto(msg)
    assert info.value.field == "spec.ids[1]"
    assert info.value.message.startswith("spec.ids[1] must name an adapter, got '\\t\\t")
    assert len(info.value.message) <= BOUND and "…(5000 chars)" in info.value.message


def test_inference_spec_summary_cuts_ids() -> None:
    spec = merge_pb2.MergeSpec(adapters=[merge_pb2.AdapterRef(id=LONG, weight=0.5)])
    assert len(describe_spec(spec)) < 120
