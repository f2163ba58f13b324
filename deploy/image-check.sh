#!/usr/bin/env bash
# The image's runtime stage, proven without a Docker engine: builds the static release
# binaries for x86_64 and arm64 exactly as deploy/Dockerfile's build stage does, checks that they are static and
# small enough for the 25 MB image goal, then runs them the way the image runs them: as uid
# and gid 65532 with no supplementary groups and no new privileges, from a read-only root
# (a read-only bind mount in a private mount namespace), with an empty environment and no
# shell in between; the proxy and the control plane must answer /ready, the proxy must route,
# and both must exit 0 on SIGTERM. The arm64 binaries must be static AArch64 ELF files that run
# under qemu-aarch64 (--help, a validate, a proxy that routes and exits 0 on SIGTERM). Needs
# root (mount namespace, setpriv, apt-get for what is missing).
#
# A release build (fat LTO) takes minutes on this machine, so .ci/run does not run this on
# every change; run it after touching the Dockerfile, the release profile or the binaries'
# flags: `bash deploy/image-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
arm=aarch64-unknown-linux-musl
# Where cargo puts its output (CARGO_TARGET_DIR, a config's build.target-dir, or ./target).
target_dir=$(cargo metadata --format-version 1 --no-deps --locked \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# The binaries the Dockerfile copies to /out (`cp "target/$target/release/NAME" /out/`) and
# the symlinks it adds, read from it so the two cannot drift apart.
mapfile -t bins < <(sed -n 's|.*cp "target/$target/release/\([a-z-]*\)" /out/.*|\1|p' deploy/Dockerfile)
[ "${#bins[@]}" -ge 1 ] || { echo "image-check: binaries not found in deploy/Dockerfile" >&2; exit 1; }
# Its symlinks: one binary called by three names (outriderctl and outrider-proxy run
# outrider-control's code for that name).
declare -A links=()
while read -r points_to name; do
  links[$name]=$points_to
done < <(sed -n 's|.*ln -s \([a-z-]*\) /out/\([a-z-]*\).*|\1 \2|p' deploy/Dockerfile)
for name in outriderctl outrider-proxy; do
  [ -n "${links[$name]:-}" ] || { echo "image-check: the $name symlink not found in deploy/Dockerfile" >&2; exit 1; }
done
link_target=${links[outriderctl]}
link_name=outriderctl
build_bins=()
for bin in "${bins[@]}"; do build_bins+=(--bin "$bin"); done

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
for t in "$target" "$arm"; do
  if ! rustup target list --installed | grep -qx "$t"; then
    rustup target add "$t"
  fi
done
# aws-lc-sys compiles C for the target: musl's gcc wrapper for x86_64, Debian's aarch64 cross
# compiler for arm64 (as deploy/Dockerfile); qemu-user runs the arm64 binaries here.
command -v musl-gcc >/dev/null 2>&1 || apt_install musl-tools
command -v protoc >/dev/null 2>&1 || apt_install protobuf-compiler libprotobuf-dev
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || [ ! -d /usr/aarch64-linux-gnu/include ]; then
  apt_install gcc-aarch64-linux-gnu libc6-dev-arm64-cross linux-libc-dev-arm64-cross
fi
command -v qemu-aarch64 >/dev/null 2>&1 || apt_install qemu-user
export CC_x86_64_unknown_linux_musl=musl-gcc
export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
for t in "$target" "$arm"; do
  echo "== cargo build --release --target $t (as deploy/Dockerfile)"
  time cargo build --locked --release --target "$t" -p outrider-control "${build_bins[@]}"
done

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "== static and small"
chmod 755 "$work"  # mktemp's 0700 would keep uid 65532 out
root="$work/root"
mkdir -p "$root/usr/local/bin" "$root/etc/outrider/policies"
total=0
for bin in "${bins[@]}"; do
  path="$target_dir/$target/release/$bin"
  ldd_out=$(ldd "$path" 2>&1 || true)
  if ! grep -qE "not a dynamic executable|statically linked" <<<"$ldd_out"; then
    echo "image-check: $bin is dynamically linked: $ldd_out" >&2
    exit 1
  fi
  size=$(stat -c %s "$path")
  total=$((total + size))
  printf '%-18s %8d KiB  static\n' "$bin" $((size / 1024))
  cp "$path" "$root/usr/local/bin/"
done
for name in "${!links[@]}"; do
  ln -s "${links[$name]}" "$root/usr/local/bin/$name"
  printf '%-18s -> %s\n' "$name" "${links[$name]}"
done
# distroless/static-debian12 is about 2 MiB; the binaries get the rest of the 25 MB goal.
budget=$((23 * 1000 * 1000))
echo "binaries total: $((total / 1024)) KiB (budget $((budget / 1024)) KiB + ~2 MiB base image)"
[ "$total" -le "$budget" ] || { echo "image-check: binaries exceed the size budget" >&2; exit 1; }

# The read-only root: policies and token as Kubernetes would mount them; the control plane's
# state is its own writable volume.
cat > "$root/etc/outrider/policy.yaml" <<'POLICY'
services:
  nowhere: { endpoints: [127.0.0.1:9] }
routes:
  - match: { authority: nowhere }
    service: nowhere
POLICY
cp deploy/kubernetes/policies/*.yaml "$root/etc/outrider/policies/"
printf 'image-check-token' > "$root/etc/outrider/token"
chmod -R a+rX,go-w "$root"
state="$work/state"
mkdir -p "$state"
chown 65532:65532 "$state"

# Prefix that runs a command as the image would: uid/gid 65532, read-only root, empty
# environment; the launcher's bash execs away, so no shell is left in the process (and a
# background job's $! is the binary's own pid, for SIGTERM).
as_image=(unshare --mount --propagation private -- bash -c '
    root=$1; shift
    mount --bind "$root" "$root" && mount -o remount,bind,ro "$root"
    cd "$root"
    exec env -i /usr/bin/setpriv --reuid 65532 --regid 65532 --clear-groups --no-new-privs "$@"
  ' as_image "$root")

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_exit_zero() { # pid name
  local code=0
  wait "$1" || code=$?
  if [ "$code" -ne 0 ]; then echo "image-check: $2 exited $code" >&2; exit 1; fi
  echo "$2: exit 0 after SIGTERM"
}

echo "== outrider-proxy as uid 65532 on a read-only root"
"${as_image[@]}" "$root/usr/local/bin/outrider-proxy" --policy "$root/etc/outrider/policy.yaml" \
  --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 --admin 127.0.0.1:0 \
  > "$work/proxy.out" 2> "$work/proxy.log" &
proxy=$!
pids+=("$proxy")
admin=""
outbound=""
for _ in $(seq 100); do
  line=$(grep -m1 '"message":"listening"' "$work/proxy.log" || true)
  if [ -n "$line" ]; then
    admin=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["admin"])' "$line")
    outbound=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["outbound"])' "$line")
    break
  fi
  kill -0 "$proxy" 2>/dev/null || break
  sleep 0.1
done
[ -n "$admin" ] || { cat "$work/proxy.log" >&2; echo "image-check: proxy did not start" >&2; exit 1; }
"${as_image[@]}" "$root/usr/local/bin/outriderctl" wait-ready --admin "$admin" --timeout 10s
echo "proxy /ready: 200 (outriderctl wait-ready, itself run as the image would)"
status=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: nowhere' "http://$outbound/")
[ "$status" = 502 ] || { echo "image-check: proxy answered $status, expected 502" >&2; exit 1; }
echo "proxy routed a request: 502 from a refused endpoint, as expected"
if grep -qi "read-only\|permission denied" "$work/proxy.log"; then
  echo "image-check: the proxy tried to write:" >&2; cat "$work/proxy.log" >&2; exit 1
fi
kill -TERM "$proxy"
wait_exit_zero "$proxy" outrider-proxy

echo "== outrider-control as uid 65532 on a read-only root"
port=$(free_port)
"${as_image[@]}" "$root/usr/local/bin/outrider-control" serve --policies "$root/etc/outrider/policies" \
  --state "$state" --listen "127.0.0.1:$port" --token-file "$root/etc/outrider/token" \
  > "$work/control.out" 2> "$work/control.log" &
control=$!
pids+=("$control")
if ! "${as_image[@]}" "$root/usr/local/bin/outriderctl" wait-ready --admin "127.0.0.1:$port" --timeout 10s; then
  cat "$work/control.log" >&2
  exit 1
fi
echo "control plane /ready: 200"
[ -n "$(ls -A "$state")" ] || { echo "image-check: no state written" >&2; exit 1; }
echo "control plane wrote its state: $(ls "$state" | tr '\n' ' ')"
kill -TERM "$control"
wait_exit_zero "$control" outrider-control
echo "== arm64 ($arm): static aarch64 ELF, run under qemu-aarch64"
for bin in "${bins[@]}"; do
  path="$target_dir/$arm/release/$bin"
  # The ELF header and program headers: 64-bit little-endian, machine 183 (AArch64), and no
  # PT_INTERP (no dynamic loader: static).
  python3 - "$path" <<'ELF'
import struct, sys
path = sys.argv[1]
with open(path, "rb") as f:
    data = f.read(1 << 16)
assert data[:4] == b"\x7fELF", f"{path}: not an ELF file"
assert data[4] == 2 and data[5] == 1, f"{path}: not 64-bit little-endian"
(machine,) = struct.unpack_from("<H", data, 18)
assert machine == 183, f"{path}: e_machine {machine}, not AArch64 (183)"
phoff, = struct.unpack_from("<Q", data, 32)
phentsize, phnum = struct.unpack_from("<HH", data, 54)
types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
assert 3 not in types, f"{path}: has PT_INTERP (dynamically linked)"
ELF
  printf '%-18s %8d KiB  static aarch64\n' "$bin" $(($(stat -c %s "$path") / 1024))
  qemu-aarch64 "$path" --help >/dev/null
done
# The CLI by its name, as the image's symlink calls it.
mkdir "$work/arm64"
for name in "${!links[@]}"; do
  ln -s "$target_dir/$arm/release/${links[$name]}" "$work/arm64/$name"
done
help=$(qemu-aarch64 "$work/arm64/$link_name" --help)
grep -q "^Usage: outriderctl" <<<"$help" \
  || { echo "image-check: $link_name (arm64) did not run as the CLI: $help" >&2; exit 1; }
echo "--help of each: ok under qemu-aarch64"
qemu-aarch64 "$work/arm64/$link_name" validate -f "$root/etc/outrider/policy.yaml"
qemu-aarch64 "$work/arm64/outrider-proxy" --policy "$root/etc/outrider/policy.yaml" \
  --outbound 127.0.0.1:0 --inbound 127.0.0.1:0 --admin 127.0.0.1:0 \
  > "$work/arm-proxy.out" 2> "$work/arm-proxy.log" &
arm_proxy=$!
pids+=("$arm_proxy")
outbound=""
for _ in $(seq 300); do
  line=$(grep -m1 '"message":"listening"' "$work/arm-proxy.log" || true)
  if [ -n "$line" ]; then
    outbound=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["outbound"])' "$line")
    break
  fi
  kill -0 "$arm_proxy" 2>/dev/null || break
  sleep 0.1
done
[ -n "$outbound" ] || { cat "$work/arm-proxy.log" >&2; echo "image-check: arm64 proxy did not start" >&2; exit 1; }
status=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: nowhere' "http://$outbound/")
[ "$status" = 502 ] || { echo "image-check: arm64 proxy answered $status, expected 502" >&2; exit 1; }
echo "arm64 proxy routed a request under qemu: 502 from a refused endpoint, as expected"
kill -TERM "$arm_proxy"
wait_exit_zero "$arm_proxy" "outrider-proxy (arm64)"
echo "image checks passed"
