#!/usr/bin/env bash
# Render every kustomize overlay under deploy/k8s/overlays/ (and each overlay with all components
# under deploy/k8s/components/) and validate the result offline and strictly against the
# Kubernetes OpenAPI schemas. Prints one line per render; exits non-zero if any fails.
#
# Needs kubectl (for `kubectl kustomize`; no cluster) and kubernetes-validate on PATH
# (`make deploy-check` puts .venv/bin first). K8S_VERSION picks the schema version.
set -uo pipefail

K8S_VERSION="${K8S_VERSION:-1.33.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/k8s" && pwd)"

for tool in kubectl kubernetes-validate; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "deploy-check: $tool not found on PATH" >&2
    exit 2
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failures=0

# check LABEL DIR: render DIR, validate it, print one line.
check() {
  local label="$1" dir="$2" out="$work/rendered.yaml" log="$work/log.txt"
  if ! kubectl kustomize "$dir" >"$out" 2>"$log"; then
    echo "FAIL $label: kustomize: $(tr '\n' ' ' <"$log")"
    failures=$((failures + 1))
    return
  fi
  local objects
  objects="$(grep -c '^kind:' "$out" || true)"
  if [[ "$objects" -eq 0 ]]; then
    echo "FAIL $label: rendered no objects"
    failures=$((failures + 1))
    return
  fi
  # A WARN means a kind with no schema (a misspelt kind, or a custom resource): this project
  # ships none, so it fails too.
  if ! kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out" >"$log" 2>&1 || grep -q 'WARN' "$log"; then
    echo "FAIL $label:"
    sed -e "s#$out#$label#g" -e 's/^/    /' "$log"
    failures=$((failures + 1))
    return
  fi
  echo "ok   $label: $objects objects valid for Kubernetes $K8S_VERSION"
}

shopt -s nullglob
overlays=("$ROOT"/overlays/*/kustomization.yaml)
components=("$ROOT"/components/*/kustomization.yaml)
if [[ ${#overlays[@]} -eq 0 ]]; then
  echo "FAIL no overlays under $ROOT/overlays" >&2
  exit 1
fi

for k in "${overlays[@]}"; do
  overlay_dir="$(dirname "$k")"
  name="$(basename "$overlay_dir")"
  check "overlay $name" "$overlay_dir"

  if [[ ${#components[@]} -gt 0 ]]; then
    # Every component on top of the overlay, composed the way an operator's own overlay would.
    combo="$work/$name+components"
    mkdir -p "$combo"
    rel="$(realpath --relative-to="$combo" "$ROOT")"
    names=()
    {
      echo "apiVersion: kustomize.config.k8s.io/v1beta1"
      echo "kind: Kustomization"
      echo "resources:"
      echo "  - $rel/overlays/$name"
      echo "components:"
      for c in "${components[@]}"; do
        cname="$(basename "$(dirname "$c")")"
        names+=("$cname")
        echo "  - $rel/components/$cname"
      done
    } >"$combo/kustomization.yaml"
    check "overlay $name + components $(IFS=,; echo "${names[*]}")" "$combo"
  fi
done

if [[ $failures -gt 0 ]]; then
  echo "deploy-check: $failures render(s) failed" >&2
  exit 1
fi
