#!/usr/bin/env bash
# MergeService/ListCached: the merge cache (entries, memory and disk use against their limits).
source "$(dirname "$0")/common.sh"
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" -d '{}' "$MERGE_ADDR" loramerge.v1.MergeService/ListCached
