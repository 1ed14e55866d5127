#!/usr/bin/env bash
# MergeService/Merge: build (or read from the cache) a merged adapter and stream it:
# progress* -> header (merge key, adapter_config.json, size, sha256, per-module stats) -> data* -> trailer.
# Usage: merge.sh [MergeRequest JSON]
# Data chunks are base64; to see only the rest: merge.sh | jq -c 'select(.data | not)'
source "$(dirname "$0")/common.sh"
body=${1:-'{
  "spec": {
    "adapters": [{"id": "a", "weight": 0.6}, {"id": "b", "weight": 0.4}],
    "merge_strategy": "TIES",
    "density": 0.5
  }
}'}
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" -d "$body" "$MERGE_ADDR" loramerge.v1.MergeService/Merge
