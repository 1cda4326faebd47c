#!/usr/bin/env bash
# Validates the distributed shape's descriptions without a container engine or a cluster:
#   1. the generated files are what deploy/generate.py makes of deploy/banks/*.toml (no hand edits);
#   2. yamllint on every YAML file;
#   3. docker-compose.yml against the Compose Specification's JSON schema (vendored in check-jsonschema);
#   4. deploy/k8s/*.yaml against Kubernetes' schemas (kubernetes-validate, strict: unknown fields fail);
#   5. deploy/check.py: that they describe the same system (every bank, probes, scrape targets, secrets),
#      and with the binary, that every SOCIALCARD_* variable is one the service reads;
#   6. `docker compose config` too, where the Compose plugin is installed.
# The tools come from PyPI into a virtualenv under target/ (kept between runs).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${SOCIALCARD_DEPLOY_VENV:-target/deploy-venv}"
tools=(yamllint==1.38.0 check-jsonschema==0.39.0 kubernetes-validate==1.37.0)
stamp="$venv/.tools-$(echo "${tools[*]}" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${tools[@]}"
  touch "$stamp"
fi
py="$venv/bin/python"
k8s_version="${SOCIALCARD_K8S_VERSION:-1.31.0}"

echo "deploy: generated files up to date"
"$py" deploy/generate.py --check
echo "deploy: yamllint"
"$venv/bin/yamllint" --strict -c deploy/yamllint.yaml docker-compose.yml deploy
echo "deploy: docker-compose.yml against the compose-spec schema"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
echo "deploy: Kubernetes manifests against the v${k8s_version} schemas"
manifests=()
for f in deploy/k8s/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
"$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$k8s_version" "${manifests[@]}"
echo "deploy: cross-checks"
bin="${SOCIALCARD_BIN:-target/debug/socialcard}"
if [ -x "$bin" ]; then
  "$py" deploy/check.py --bin "$bin"
else
  echo "deploy: no $bin; the services' variables are not checked against it" >&2
  "$py" deploy/check.py
fi
if docker compose version >/dev/null 2>&1; then
  echo "deploy: docker compose config"
  SOCIALCARD_PIN_KEY=00 docker compose config --quiet
fi
echo "deploy: valid"
