#!/usr/bin/env bash
# InferenceService/ListAdapters: adapters loaded in the engine (name, merge key, rank, use).
source "$(dirname "$0")/common.sh"
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" -d '{}' "$INFERENCE_ADDR" loramerge.v1.InferenceService/ListAdapters
