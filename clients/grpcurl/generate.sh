#!/usr/bin/env bash
# InferenceService/Generate with a merged set of adapters (LoRAX-style ids/weights), merged on
# demand: the first call fetches the merge, later ones with the same spec reuse the loaded adapter.
# Usage: generate.sh [GenerateRequest JSON]
source "$(dirname "$0")/common.sh"
body=${1:-'{
  "prompt": "The quick brown fox",
  "sampling": {"max_tokens": 16},
  "merged_adapters": {
    "ids": ["a", "b"],
    "weights": [0.5, 0.5],
    "merge_strategy": "LINEAR"
  }
}'}
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" -d "$body" "$INFERENCE_ADDR" loramerge.v1.InferenceService/Generate
