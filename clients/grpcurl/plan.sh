#!/usr/bin/env bash
# MergeService/Plan: what a spec resolves to (merge key, revisions, digests, rank, size, cached?)
# without building anything.
# Usage: plan.sh [MergeRequest JSON]
source "$(dirname "$0")/common.sh"
body=${1:-'{
  "spec": {
    "ids": ["a", "b"],
    "weights": [0.6, 0.4],
    "merge_strategy": "DARE_TIES",
    "density": 0.7,
    "seed": "42"
  }
}'}
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" -d "$body" "$MERGE_ADDR" loramerge.v1.MergeService/Plan
