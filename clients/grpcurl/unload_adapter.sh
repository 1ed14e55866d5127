#!/usr/bin/env bash
# InferenceService/UnloadAdapter: by merge key (or with --name, by vLLM LoRA name).
# Usage: unload_adapter.sh MERGE_KEY | unload_adapter.sh --name NAME
source "$(dirname "$0")/common.sh"
case ${1:-} in
  --name) body="{\"name\": \"${2:?usage: $0 --name NAME}\"}" ;;
  "") echo "usage: $0 MERGE_KEY | --name NAME" >&2; exit 2 ;;
  *) body="{\"merge_key\": \"$1\"}" ;;
esac
exec "$GRPCURL" "${GRPCURL_ARGS[@]}" -d "$body" "$INFERENCE_ADDR" loramerge.v1.InferenceService/UnloadAdapter
