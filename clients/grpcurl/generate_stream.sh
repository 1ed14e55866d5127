#!/usr/bin/env bash
# InferenceService/GenerateStream: the same request; one message per text delta, the first carrying
# the adapter usage, the last the finish reason and token counts.
# Usage: generate_stream.sh [GenerateRequest JSON]
source "$(dirname "$0")/common.sh"
body=${1:-'{
  "prompt": "Once upon a time",
  "sampling": {"max_tokens": 16, "temperature": 0.8, "seed": "7"},
  "adapter_id": "a"
}'}
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" -d "$body" "$INFERENCE_ADDR" loramerge.v1.InferenceService/GenerateStream
