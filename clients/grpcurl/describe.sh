#!/usr/bin/env bash
# List and describe what a service exposes, through gRPC reflection.
# Usage: describe.sh [ADDR] [SYMBOL]   e.g. describe.sh 127.0.0.1:50061 loramerge.v1.MergeSpec
source "$(dirname "$0")/common.sh"
addr=${1:-$MERGE_ADDR}
if [[ $# -ge 2 ]]; then
  exec "$GRPCURL" "${GRPCURL_ARGS[@]}" "$addr" describe "$2"
fi
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" "$addr" list
