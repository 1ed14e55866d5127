#!/usr/bin/env bash
# MergeService/Evict: drop one cached merge, or all of them; the next request rebuilds it.
# Usage: evict.sh MERGE_KEY | evict.sh --all
source "$(dirname "$0")/common.sh"
case ${1:-} in
  --all) body='{"all": true}' ;;
  "") echo "usage: $0 MERGE_KEY | --all" >&2; exit 2 ;;
  *) body="{\"merge_key\": \"$1\"}" ;;
esac
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" -d "$body" "$MERGE_ADDR" loramerge.v1.MergeService/Evict
