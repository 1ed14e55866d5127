# Sourced by every recipe: addresses, transport security and auth for grpcurl.
#   MERGE_ADDR      merge service host:port      (default 127.0.0.1:50061)
#   INFERENCE_ADDR  inference service host:port  (default 127.0.0.1:50051)
#   GRPCURL         the grpcurl binary           (default: grpcurl on PATH)
#   GRPCURL_TLS     TLS flags instead of -plaintext, e.g. "-cacert ca.pem -cert client.pem -key client.key"
#   LORAMERGE_TOKEN bearer token, sent as "authorization: Bearer <token>" (the admin token for
#                   load_adapter.sh, unload_adapter.sh and cache eviction when auth is on)
#   GRPCURL_FLAGS   anything else, e.g. "-max-time 60 -v"
# The services run gRPC reflection, so no .proto files are needed. grpcurl exits with 64 + the
# gRPC status code on an error (e.g. 67 = INVALID_ARGUMENT, 78 = UNAVAILABLE).
set -euo pipefail
MERGE_ADDR=${MERGE_ADDR:-127.0.0.1:50061}
INFERENCE_ADDR=${INFERENCE_ADDR:-127.0.0.1:50051}
GRPCURL=${GRPCURL:-grpcurl}
read -r -a GRPCURL_ARGS <<<"${GRPCURL_TLS:--plaintext}"
if [[ -n ${LORAMERGE_TOKEN:-} ]]; then
  GRPCURL_ARGS+=(-H "authorization: Bearer ${LORAMERGE_TOKEN}")
fi
if [[ -n ${GRPCURL_FLAGS:-} ]]; then
  read -r -a _extra <<<"${GRPCURL_FLAGS}"
  GRPCURL_ARGS+=("${_extra[@]}")
fi
