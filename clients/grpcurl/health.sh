#!/usr/bin/env bash
# grpc.health.v1.Health/Check on both services (or one: health.sh merge | health.sh inference).
# Exits non-zero unless every service asked about answers SERVING.
source "$(dirname "$0")/common.sh"
check() {  # ADDR SERVICE
  local out status
  out=$("$GRPCURL" "${GRPCURL_ARGS[@]}" -d "{\"service\": \"$2\"}" "$1" grpc.health.v1.Health/Check 2>&1) || true
  status=$(sed -n 's/.*"status": *"\([A-Z_]*\)".*/\1/p' <<<"$out")
  echo "$2 @ $1: ${status:-$(tail -n 1 <<<"$out")}"
  [[ $status == SERVING ]]
}
status=0
case ${1:-both} in
  merge) check "$MERGE_ADDR" loramerge.v1.MergeService || status=$? ;;
  inference) check "$INFERENCE_ADDR" loramerge.v1.InferenceService || status=$? ;;
  both)
    check "$MERGE_ADDR" loramerge.v1.MergeService || status=$?
    check "$INFERENCE_ADDR" loramerge.v1.InferenceService || status=$?
    ;;
  *) echo "usage: $0 [merge|inference|both]" >&2; exit 2 ;;
esac
exit "$status"
