#!/usr/bin/env bash
# InferenceService/LoadAdapter: push an adapter in the Merge stream's chunk format (client stream).
# Usage:
#   merge.sh | load_adapter.sh        pipe a Merge stream straight in (pre-warm a merge)
#   load_adapter.sh < chunks.json     any concatenated MergeChunk JSON messages
#   load_adapter.sh DIR [MERGE_KEY]   a PEFT folder (adapter_config.json + adapter_model.safetensors),
#                                     sent as header, 1 MiB data chunks, trailer (needs jq, base64)
source "$(dirname "$0")/common.sh"
call() { "$GRPCURL" "${GRPCURL_ARGS[@]}" -d @ "$INFERENCE_ADDR" loramerge.v1.InferenceService/LoadAdapter; }
if [[ $# -eq 0 ]]; then
  call
  exit
fi
dir=$1
key=${2:-}
weights=$dir/adapter_model.safetensors
size=$(stat -c %s "$weights")
sha=$(sha256sum "$weights" | cut -d' ' -f1)
chunk=$((1 << 20))
{
  jq -cn --rawfile cfg "$dir/adapter_config.json" --arg sha "$sha" --arg key "$key" --argjson size "$size" \
    '{header: {merge_key: $key, adapter_config_json: $cfg, total_bytes: $size, sha256: $sha,
               file_name: "adapter_model.safetensors"}}'
  for ((offset = 0; offset < size; offset += chunk)); do
    printf '{"data": {"offset": %d, "data": "%s"}}\n' "$offset" \
      "$(tail -c +$((offset + 1)) "$weights" | head -c "$chunk" | base64 -w0)"
  done
  printf '{"trailer": {"total_bytes": %d, "sha256": "%s"}}\n' "$size" "$sha"
} | call
