#!/usr/bin/env bash
# Creates the Secrets the manifests mount: socialcard-registry (database URL, PIN key) and, per service
# under mutual TLS, socialcard-tls-<service> holding only that service's certificates (the CA, its server
# certificate, and its client certificate for the services it calls). With no PKI directory given, a
# development one is generated with `socialcard certs`; give your own CA's files in the same layout for
# anything real. Needs kubectl and the socialcard binary.
#
#   deploy/k8s/create-secrets.sh [pki-dir]        (namespace: $NAMESPACE, default socialcard)
#   SOCIALCARD_REGISTRY_DATABASE_URL=postgres://... SOCIALCARD_PIN_KEY=<hex> SOCIALCARD_DATA_KEY=<hex> deploy/k8s/create-secrets.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ns="${NAMESPACE:-socialcard}"
pki="${1:-}"
if [ -z "$pki" ]; then
  pki="$(mktemp -d)"
  trap 'rm -rf "$pki"' EXIT
  socialcard certs --out "$pki" --banks-dir deploy/banks >/dev/null
fi
apply() { kubectl -n "$ns" create secret generic "$@" --dry-run=client -o yaml | kubectl -n "$ns" apply -f -; }

: "${SOCIALCARD_REGISTRY_DATABASE_URL:?set SOCIALCARD_REGISTRY_DATABASE_URL (postgres://...)}"
: "${SOCIALCARD_PIN_KEY:?set SOCIALCARD_PIN_KEY to a hex key of 32 bytes}"
: "${SOCIALCARD_DATA_KEY:?set SOCIALCARD_DATA_KEY to a hex key of 32 bytes}"
apply socialcard-registry --from-literal=database-url="$SOCIALCARD_REGISTRY_DATABASE_URL" \
  --from-literal=pin-key="$SOCIALCARD_PIN_KEY" --from-literal=data-key="$SOCIALCARD_DATA_KEY"

apply socialcard-tls-registry --from-file=ca.pem="$pki/ca.pem" \
  --from-file=server.pem="$pki/servers/registry.pem" --from-file=server.key="$pki/servers/registry.key"
services=(loss-coordinator)
for bank in deploy/banks/*.toml; do
  services+=("bank-adapter-$(basename "$bank" .toml)")
done
for s in "${services[@]}"; do
  apply "socialcard-tls-$s" --from-file=ca.pem="$pki/ca.pem" \
    --from-file=server.pem="$pki/servers/$s.pem" --from-file=server.key="$pki/servers/$s.key" \
    --from-file=client.pem="$pki/services/$s.pem" --from-file=client.key="$pki/services/$s.key"
done
