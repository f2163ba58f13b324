#!/usr/bin/env bash
# benches/instructions.sh: CPU instructions the proxy executes per request, counted by valgrind's
# callgrind, for Outrider without and with each optional feature on the path. Not part of the
# tests.
#
# Why next to load.sh: on a shared VM, max-throughput runs vary by +-20% from run to run, more than
# the 10% a feature may cost. An instruction count does not depend on the neighbours: the same
# build and the same requests give the same count to within about 1%, so small costs (a policy,
# tracing, the access log) are seen exactly. It does not see cache misses or syscall time (the
# kernel is not counted); load.sh stays the throughput and latency measurement.
#
# Usage: bash benches/instructions.sh [--requests N] [--variants LETTERS] [--out FILE]
#   --requests N        measured requests per variant (default 5000, after 1000 unmeasured)
#   --variants LETTERS  which variants to run, e.g. bp (default bptlr, all of them)
#   --out FILE          markdown report (default benches/results/instructions.md)
#   --keep              keep the callgrind profiles (callgrind-*.out, for callgrind_annotate) and
#                       print their directory
#
# Variants, each over HTTP/1.1 and h2c (the upstream speaks the same protocol):
#   (b) base: one service, one route;
#   (p) every resilience policy on, none triggering (as load.sh --policies);
#   (t) tracing at ratio 1.0, exported over OTLP/HTTP to a bench-upstream sink;
#   (l) the JSON access log on (stdout to a file);
#   (r) the route among 100 (as load.sh --routes: benches/policy-variants.sh many_routes_fragment).
# And nginx (one worker, configured as in load.sh, HTTP/1.1 only) as the reference: the same load
# through it, its worker's instructions counted the same way, when nginx is installed.
# Load: oha, 16 keep-alive connections (h2c: 16 connections, one stream each), 127.0.0.1 only.
set -euo pipefail
shopt -s inherit_errexit

REQUESTS=5000
WARM=1000
VARIANTS=bptlr
OUT=benches/results/instructions.md
KEEP=0
while (($#)); do
    case "$1" in
    --requests) REQUESTS=${2:?--requests needs a number}; shift ;;
    --variants) VARIANTS=${2:?--variants needs letters}; shift ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    --keep) KEEP=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "instructions.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
[[ $REQUESTS =~ ^[1-9][0-9]*$ ]] || { echo "instructions.sh: --requests $REQUESTS is not a positive integer" >&2; exit 64; }
[[ $VARIANTS =~ ^[bptlr]+$ && $VARIANTS == *b* ]] || { echo "instructions.sh: --variants $VARIANTS: letters among b, p, t, l, r, including b (the reference)" >&2; exit 64; }

HOST=127.0.0.1
PORT_UPSTREAM=18180
PORT_OUTBOUND=18181
PORT_INBOUND=18182
PORT_ADMIN=18183
PORT_COLLECTOR=18184
CONNS=16

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=benches/policy-variants.sh
source benches/policy-variants.sh
export PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"
log() { printf '[instructions.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The binaries cargo builds, wherever CARGO_TARGET_DIR puts them.
RELEASE=${CARGO_TARGET_DIR:-target}/release
PIDS=()
TMP=$(mktemp -d -t outrider-instructions.XXXXXX)
cleanup() {
    local pid
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if ((KEEP)); then log "profiles kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }
if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    log "installing valgrind"
    as_root apt-get install -y -qq valgrind >/dev/null || die "cannot install valgrind"
fi
if ! command -v jq >/dev/null; then
    as_root apt-get install -y -qq jq >/dev/null || die "cannot install jq"
fi
if ! command -v oha >/dev/null; then
    log "installing oha (cargo install)"
    cargo install --locked oha >/dev/null || die "cannot install oha"
fi

log "building release binaries"
cargo build --release -q -p outrider-proxy -p outrider-benches --bin outrider-proxy --bin bench-upstream
# One run at a time on this machine: a second would bind the same ports and send its load to the
# first one's proxy, and both counts would be wrong.
exec {LOCK_FD}>"${TMPDIR:-/tmp}/outrider-instructions.lock"
if ! flock -n "$LOCK_FD"; then
    log "waiting for another instructions.sh run on this machine to finish"
    flock "$LOCK_FD"
fi

wait_http() { # $1 url; up to 30 s (the proxy starts slowly under valgrind)
    local i
    for ((i = 0; i < 300; i++)); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

"$RELEASE"/bench-upstream --listen "$HOST:$PORT_UPSTREAM" >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
"$RELEASE"/bench-upstream --listen "$HOST:$PORT_COLLECTOR" >"$TMP/collector.log" 2>&1 &
PIDS+=($!)

# $1: protocol (http1|http2); $2: variant (b|p|t|l|r). Prints the policy.
policy() {
    local with=""
    case $2 in
    p) with=policies ;;
    t) with=tracing ;;
    l) with=accesslog ;;
    r) with=routes100 ;;
    esac
    bench_policy "$1" "$with"
}

# $1 requests, $2 extra oha flag (--http2 or empty), $3 JSON output. The authority is `bench` in
# both protocols (an h2 request's :authority comes from the URL, not from a Host header).
load() {
    oha -n "$1" -c "$CONNS" --no-tui $2 --connect-to "bench:$PORT_OUTBOUND:$HOST:$PORT_OUTBOUND" \
        --output-format json "http://bench:$PORT_OUTBOUND/" >"$3" || die "oha failed"
}

# Runs `$@` under callgrind, counting only while $REQUESTS requests go through it (after $WARM
# uncounted). $1: a name for messages and files; $2: a URL that answers once it serves; $3: oha's
# extra flag (--http2 or empty); the rest: the command. Prints instructions per counted request.
count_instructions() {
    local name=$1 ready=$2 flag=$3 out=$TMP/callgrind-$1 pid ir ok
    shift 3
    # The proxy's output (the access log of the (l) runs) goes to another directory than the
    # policy file's: the proxy watches that directory, and would wake on every write to the log.
    mkdir -p "$TMP/out"
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out.out" \
        "$@" >"$TMP/out/callgrind-$name.stdout" 2>"$out.log" &
    pid=$!
    PIDS+=("$pid")
    wait_http "$ready" || die "$name not ready: $(tail -5 "$out.log")"
    load "$WARM" "$flag" "$out.warm.json"
    callgrind_control -i on "$pid" >/dev/null
    load "$REQUESTS" "$flag" "$out.json"
    callgrind_control -i off "$pid" >/dev/null
    ok=$(jq -r '.statusCodeDistribution["200"] // 0' "$out.json")
    ((ok == REQUESTS)) || die "$name: $ok of $REQUESTS requests got 200: $(jq -c '[.statusCodeDistribution, .errorDistribution]' "$out.json")"
    kill -TERM "$pid"
    wait "$pid" || true
    ir=$(grep -o 'Collected : [0-9]*' "$out.log" | awk '{ print $3 }')
    [[ -n $ir ]] || die "no callgrind total ($name): $(tail -5 "$out.log")"
    awk -v ir="$ir" -v n="$REQUESTS" 'BEGIN { printf "%.0f", ir / n }'
}

# $1: protocol; $2: variant. Prints instructions per measured request.
measure() {
    local flag="" pol="$TMP/policy-$1-$2.yaml"
    [[ $1 == http2 ]] && flag=--http2
    policy "$1" "$2" >"$pol"
    count_instructions "$1-$2" "http://$HOST:$PORT_ADMIN/ready" "$flag" \
        "$RELEASE"/outrider-proxy --policy "$pol" --workers 1 \
        --outbound "$HOST:$PORT_OUTBOUND" --inbound "$HOST:$PORT_INBOUND" --admin "$HOST:$PORT_ADMIN" \
        --drain-timeout 1s
}

# nginx, run without a master process so callgrind follows the one process serving.
measure_nginx() {
    local dir=$TMP/nginx
    mkdir -p "$dir"
    nginx_conf "$dir" "listen $HOST:$PORT_OUTBOUND;" "master_process off;" >"$dir/nginx.conf"
    count_instructions nginx "http://$HOST:$PORT_OUTBOUND/" "" \
        nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log"
}

declare -A IR
if command -v nginx >/dev/null; then
    log "nginx (reference): $REQUESTS requests under callgrind"
    IR[nginx]=$(measure_nginx)
    log "  ${IR[nginx]} instructions/request"
else
    log "nginx not installed: no reference row (bash benches/load.sh installs it)"
fi
for proto in http1 http2; do
    for variant in b p t l r; do
        [[ $VARIANTS == *$variant* ]] || continue
        log "$proto ($variant): $REQUESTS requests under callgrind"
        IR[$proto-$variant]=$(measure "$proto" "$variant")
        log "  ${IR[$proto-$variant]} instructions/request"
    done
done

pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f%%", (a / b - 1) * 100 }'; }
mkdir -p "$(dirname "$OUT")"
{
    echo "# Outrider: instructions per request (callgrind)"
    echo
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') by \`bash benches/instructions.sh${REQUESTS:+ --requests $REQUESTS}\` on $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- proxy config || echo ' (with local changes)')."
    echo
    echo "- Instructions executed by outrider-proxy (all its threads, user space only) over $REQUESTS requests"
    echo "  (after $WARM unmeasured), divided by $REQUESTS. oha, $CONNS connections, GET, 12-byte response, 127.0.0.1."
    echo "- Release build, \`--workers 1\`. Deterministic to about 1%: use it for relative costs; load.sh measures throughput."
    echo
    echo "| Variant | HTTP/1.1 instr/req | vs (b) | h2c instr/req | vs (b) |"
    echo "|---|---:|---:|---:|---:|"
    for variant in b p t l r; do
        [[ $VARIANTS == *$variant* ]] || continue
        case $variant in
        b) name="(b) base" ;;
        p) name="(p) every resilience policy on, none triggering" ;;
        t) name="(t) tracing ratio 1.0, OTLP/HTTP export" ;;
        l) name="(l) JSON access log" ;;
        r) name="(r) the route among 100 (goal: within 3% of (b))" ;;
        esac
        echo "| $name | ${IR[http1-$variant]} | $(pct "${IR[http1-$variant]}" "${IR[http1-b]}") | ${IR[http2-$variant]} | $(pct "${IR[http2-$variant]}" "${IR[http2-b]}") |"
    done
    if [[ -n ${IR[nginx]:-} ]]; then
        echo "| nginx $(nginx -v 2>&1 | sed 's|.*nginx/||'), one worker (reference, HTTP/1.1 upstream) | ${IR[nginx]} | $(pct "${IR[nginx]}" "${IR[http1-b]}") | | |"
        echo
        echo "nginx's row: its worker's instructions under the same load (configured as in load.sh). Both"
        echo "make the same reads and writes per request (strace: nginx adds a getpid and a getsockopt); this"
        echo "is the user-space part of the CPU cost."
    fi
} >"$OUT"
log "wrote $OUT"
cat "$OUT"
