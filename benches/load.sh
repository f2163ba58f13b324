#!/usr/bin/env bash
# benches/load.sh: Outrider's load benchmark. Direct-to-upstream vs through Outrider vs through
# nginx, HTTP/1.1 and h2c, on 127.0.0.1 only, pinned like a 1-CPU pod. Not part of the tests.
#
# Usage: bash benches/load.sh [--quick] [--policies] [--observability] [--mtls] [--capture] [--rounds N]
#                             [--duration SECS] [--rate RPS] [--out FILE] [--keep-tmp]
#   --quick        1 round of 3 s runs (smoke run); writes benches/results/quick.md (git-ignored)
#   --policies     only Outrider without and with every resilience policy enabled but never
#                  triggering (the policy-cost comparison; no direct or nginx runs)
#   --routes       only Outrider with its one-route policy and (r) with that route among 100
#                  (benches/policy-variants.sh: many_routes_fragment), the cost of routing
#                  (goal: (r) within 3% of (b); no direct or nginx runs)
#   --observability  only Outrider without and with (t) tracing at ratio 1.0 exporting every
#                  span over OTLP/HTTP to a sink, and (l) the JSON access log on (to a file), the
#                  cost of observability (no direct or nginx runs)
#   --mtls         only the sidecar-to-sidecar path, plaintext vs mesh mTLS: wrk -> proxy A
#                  outbound -> proxy B inbound -> bench-upstream (keep-alive throughput, CPU of
#                  A+B per request), and bench-connect opening a new connection per request to
#                  B's inbound (connections/s, B's CPU per connection); certificates from a real
#                  outrider-control. Writes benches/results/mtls.md
#   --capture      only transparent capture against the explicit mode (needs root: network
#                  namespaces): wrk and the proxy in a pod namespace with the rules of
#                  `outrider-proxy init`, bench-upstream in a second namespace behind a veth pair;
#                  wrk calls the proxy's outbound port (explicit) or the upstream's pod address
#                  (captured), keep-alive and a new connection per request. Writes
#                  benches/results/capture.md
#   --rounds N     rounds; medians are reported (default 3)
#   --duration S   length of each measured run in seconds (default 10)
#   --rate RPS     request rate of the open-loop latency runs (default 2000)
#   --port-base P  first of the 127.0.0.1 ports used, P to P+11 (default 18080)
#   --out FILE     markdown report (default benches/results/latest.md; mtls.md for --mtls)
#   --keep-tmp     keep the temp dir (configs, logs, raw generator output)
#   --no-build     use the release binaries already in target/release instead of building them
#                  (the report then says the binaries may not match HEAD)
#
# Layout: CPU 0 runs the load generator; CPU 1 runs bench-upstream and the proxy under test
# (outrider-proxy --workers 1, or nginx with one worker). Generators: wrk (HTTP/1.1) and h2load
# (h2c) for closed-loop max throughput, oha for open-loop latency at a fixed rate.
set -euo pipefail
shopt -s inherit_errexit

INVOCATION=${*:+ $*}   # the flags, for the report
ROUNDS=3
DURATION=10
RATE=2000
PORT_BASE=18080
QUICK=0
POLICIES_ONLY=0
OBSERVABILITY=0
ROUTES=0
MTLS=0
CAPTURE=0
KEEP_TMP=0
NO_BUILD=0
OUT=""
while (($#)); do
    case "$1" in
    --quick) QUICK=1 ROUNDS=1 DURATION=3 ;;
    --policies) POLICIES_ONLY=1 ;;
    # Shares --policies' shape: Outrider variants only.
    --observability) POLICIES_ONLY=1 OBSERVABILITY=1 ;;
    --routes) POLICIES_ONLY=1 ROUTES=1 ;;
    --mtls) MTLS=1 ;;
    --capture) CAPTURE=1 ;;
    --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
    --duration) DURATION=${2:?--duration needs seconds}; shift ;;
    --rate) RATE=${2:?--rate needs requests/s}; shift ;;
    --port-base) PORT_BASE=${2:?--port-base needs a port}; shift ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    --keep-tmp) KEEP_TMP=1 ;;
    --no-build) NO_BUILD=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "load.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
for n in "$ROUNDS" "$DURATION" "$RATE" "$PORT_BASE"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "load.sh: $n is not a positive integer" >&2; exit 64; }
done
if ((PORT_BASE < 1024 || PORT_BASE > 65524)); then
    echo "load.sh: --port-base $PORT_BASE: the ports P to P+11 must be 1024-65535" >&2
    exit 64
fi
if ((MTLS && POLICIES_ONLY)); then
    echo "load.sh: --mtls runs on its own (not with --policies or --observability)" >&2
    exit 64
fi
if ((CAPTURE && (MTLS || POLICIES_ONLY))); then
    echo "load.sh: --capture runs on its own (not with --mtls, --policies or --observability)" >&2
    exit 64
fi
if ((CAPTURE)) && [[ $(id -u) != 0 ]]; then
    echo "load.sh: --capture needs root (network namespaces and netfilter rules)" >&2
    exit 64
fi

# ---- fixed parameters -------------------------------------------------------------------
LOADGEN_CPU=0          # the load generator
SERVER_CPU=1           # bench-upstream + the proxy under test
H1_CONNS=64            # HTTP/1.1: keep-alive connections
H2_CONNS=4             # h2c: connections ...
H2_STREAMS=16          # ... times concurrent streams each = 64 requests in flight
WARMUP=1               # seconds of unmeasured load before each target's runs
HOST=127.0.0.1
PORT_UPSTREAM=$PORT_BASE
PORT_OUTBOUND=$((PORT_BASE + 1))
PORT_INBOUND=$((PORT_BASE + 2))
PORT_ADMIN=$((PORT_BASE + 3))
PORT_COLLECTOR=$((PORT_BASE + 4))   # --observability: a bench-upstream answering OTLP/HTTP posts with 200
PORT_NGINX_H1=$((PORT_BASE + 10))
PORT_NGINX_H2=$((PORT_BASE + 11))
# --mtls: proxy A (the caller's sidecar) uses the outbound/inbound/admin ports above; proxy B
# (the callee's sidecar, in front of bench-upstream) and the control plane these.
PORT_B_OUTBOUND=$((PORT_BASE + 5))
PORT_B_INBOUND=$((PORT_BASE + 6))
PORT_B_ADMIN=$((PORT_BASE + 7))
PORT_CONTROL=$((PORT_BASE + 8))
CONNECT_WORKERS=32     # --mtls: bench-connect's concurrent connections (one request each)
MESH_NS=bench          # --mtls: namespace of both identities (service accounts client, server)
SERVER_ID=spiffe://cluster.local/ns/$MESH_NS/sa/server

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=benches/policy-variants.sh
source benches/policy-variants.sh
# Smoke runs go to a git-ignored file, so they never replace the committed figures.
if [[ -z $OUT ]]; then
    if ((QUICK)); then
        OUT=benches/results/quick.md
    elif ((MTLS)); then
        OUT=benches/results/mtls.md
    elif ((CAPTURE)); then
        OUT=benches/results/capture.md
    else
        OUT=benches/results/latest.md
    fi
fi
export PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"

log() { printf '[load.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- processes we start, and cleanup ----------------------------------------------------
PIDS=()     # every background process this script started (or nginx workers it caused)
NETNS=()    # --capture: the network namespaces this script created
TMP=""
cleanup() {
    local status=$? pid ns
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
    for ns in "${NETNS[@]}"; do ip netns del "$ns" 2>/dev/null; done
    if [[ -n $TMP && -d $TMP ]]; then
        if ((KEEP_TMP)) || ((status != 0)); then
            log "logs and configs kept in $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background with output to log file $1; sets LAST_PID.
LAST_PID=""
start_bg() {
    local logfile=$1
    shift
    "$@" >"$logfile" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# Stops one process we started: TERM, up to 5 s, then KILL.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Waits until something accepts on 127.0.0.1:$2 while process $1 lives (log in $3).
wait_port() {
    local pid=$1 port=$2 logfile=$3
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || die "process $pid exited before listening on $port: $(tail -5 "$logfile")"
        if (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    die "nothing listens on $HOST:$port after 5 s (pid $pid): $(tail -5 "$logfile")"
}

# ---- tools ------------------------------------------------------------------------------
as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    ((APT_UPDATED)) || { as_root apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >&2
}

ensure_tools() {
    local missing=()
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v jq >/dev/null || missing+=(jq)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v curl >/dev/null || missing+=(curl)
    # --mtls and --capture need only wrk (and --mtls its own bench-connect).
    ((MTLS || CAPTURE)) || command -v h2load >/dev/null || missing+=(nghttp2-client)
    if ((CAPTURE)); then
        command -v ip >/dev/null || missing+=(iproute2)
        command -v nft >/dev/null || command -v iptables-restore >/dev/null || missing+=(nftables)
        command -v setpriv >/dev/null || missing+=(util-linux)
    fi
    local need_nginx=0
    ((POLICIES_ONLY || MTLS || CAPTURE)) || command -v nginx >/dev/null || need_nginx=1
    ((need_nginx)) && missing+=(nginx)
    if ((${#missing[@]})); then
        log "installing Debian packages: ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    if ((need_nginx)); then
        # The package may start and enable a system nginx; we run our own, so stop it.
        if [[ -d /run/systemd/system ]]; then
            as_root systemctl disable --now nginx >/dev/null 2>&1 || true
        elif [[ -s /run/nginx.pid ]]; then
            as_root nginx -s stop >/dev/null 2>&1 || true
        fi
    fi
    if ((!MTLS && !CAPTURE)) && ! command -v oha >/dev/null; then
        log "installing oha (cargo install oha --locked; several minutes on 2 cores)"
        cargo install oha --locked >&2
    fi
}

check_ports_free() {
    local port
    for port in $PORT_UPSTREAM $PORT_OUTBOUND $PORT_INBOUND $PORT_ADMIN $PORT_COLLECTOR $PORT_NGINX_H1 $PORT_NGINX_H2 \
        $PORT_B_OUTBOUND $PORT_B_INBOUND $PORT_B_ADMIN $PORT_CONTROL; do
        if (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null; then
            die "port $HOST:$port is already in use"
        fi
    done
}

# ---- measurement helpers ----------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)

# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat).
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# CPU time of a process in nanoseconds: the run time the scheduler accounted to each of its
# threads (first field of /proc/PID/task/*/schedstat). The main table uses it rather than
# utime+stime, whose 10 ms ticks quantize a 2,000 req/s run to steps of a few per cent.
cpu_ns() { cat "/proc/$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f\n", s }'; }

# A field of /proc/PID/status in kB (VmRSS, VmHWM).
status_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

RESULTS=""   # lines: proto target metric round value
record() { printf '%s %s %s %s %s\n' "$1" "$2" "$3" "$ROUND" "$4" >>"$RESULTS"; }

COMMANDS=""  # every distinct command line, for the report
# Records a command line, single-quoting the words that need it, so it can be pasted.
note_cmd() {
    local word line=""
    for word in "$@"; do
        [[ $word =~ ^[][A-Za-z0-9_./:=@,+%-]+$ ]] || word="'$word'"
        line+="${line:+ }$word"
    done
    printf '%s\n' "$line" >>"$COMMANDS"
}

# Runs a generator, bounded in time, pinned to the load-generator CPU.
gen() {
    note_cmd taskset -c "$LOADGEN_CPU" "$@"
    timeout --foreground -k 5 $((DURATION + WARMUP + 60)) taskset -c "$LOADGEN_CPU" "$@"
}

WRK_LUA=""   # set up in main
# Closed loop, HTTP/1.1: wrk, one thread, $H1_CONNS connections. Prints "requests rps errors".
run_wrk() {
    local port=$1 secs=$2 out=$3
    gen wrk -t1 -c"$H1_CONNS" -d"${secs}s" -H "Host: bench" -s "$WRK_LUA" "http://$HOST:$port/" >"$out" 2>&1 ||
        die "wrk failed: $(tail -5 "$out")"
    awk '/^WRK / {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%d %.1f %d\n", v["requests"], v["requests"] / (v["duration_us"] / 1e6),
            v["status"] + v["connect"] + v["read"] + v["write"] + v["timeout"]
    }' "$out"
}

# Closed loop, h2c: h2load, $H2_CONNS connections x $H2_STREAMS streams. Same output.
run_h2load() {
    local port=$1 secs=$2 out=$3
    gen h2load -c "$H2_CONNS" -m "$H2_STREAMS" -D "$secs" -H ":authority: bench" "http://$HOST:$port/" >"$out" 2>&1 ||
        die "h2load failed: $(tail -5 "$out")"
    awk '
        /^finished in/ { rps = $4 }
        /^requests:/ { done = $6; failed = $10; errored = $12; timeout = $14 }
        /^status codes:/ { non2xx = $5 + $7 + $9 }
        END { if (rps == "") exit 1; printf "%d %.1f %d\n", done, rps, failed + errored + timeout + non2xx }
    ' "$out" || die "cannot parse h2load output: $(tail -5 "$out")"
}

# Open loop at $RATE req/s with coordinated-omission correction: oha. Prints
# "requests p50_ms p99_ms errors".
run_oha() {
    local proto=$1 port=$2 secs=$3 out=$4
    local args=(-c "$H1_CONNS")
    [[ $proto == h2 ]] && args=(--http2 -c "$H2_CONNS" -p "$H2_STREAMS")
    # A request count (-n) rather than a duration (-z): at a deadline oha aborts the requests
    # in flight and counts them as errors; with -n every request runs to completion.
    gen oha --no-tui --worker-threads 1 "${args[@]}" -n $((RATE * secs)) -q "$RATE" --latency-correction \
        --connect-to "bench:$port:$HOST:$port" --output-format json "http://bench:$port/" >"$out" 2>"$out.err" ||
        die "oha failed: $(tail -5 "$out.err")"
    jq -r '[
        ([.statusCodeDistribution[]] | add // 0),
        (.latencyPercentiles.p50 * 1e7 | round / 1e4),
        (.latencyPercentiles.p99 * 1e7 | round / 1e4),
        (([.statusCodeDistribution | to_entries[] | select(.key | test("^2") | not) | .value] | add // 0)
            + ([.errorDistribution[]] | add // 0))
    ] | @tsv' "$out" || die "cannot parse oha output $out"
}

# Measures one target: warm-up, closed-loop max throughput, open-loop latency at $RATE.
# $1 proto (h1|h2), $2 target label, $3 port, $4 pid whose CPU is charged.
# $1 ns of CPU over $2 requests, in µs per request.
ns_per_request() { awk -v d="$1" -v n="$2" 'BEGIN { printf "%.2f", n ? d / 1e3 / n : 0 }'; }

measure() {
    local proto=$1 target=$2 port=$3 pid=$4 base="$TMP/r$ROUND-$1-$2"
    local closed=run_wrk
    [[ $proto == h2 ]] && closed=run_h2load
    log "round $ROUND $proto $target: warm-up ${WARMUP}s, max ${DURATION}s, ${RATE} req/s ${DURATION}s"
    "$closed" "$port" "$WARMUP" "$base-warmup.txt" >/dev/null

    local t0 t1 out requests rps errors
    t0=$(cpu_ns "$pid")
    out=$("$closed" "$port" "$DURATION" "$base-max.txt")
    t1=$(cpu_ns "$pid")
    read -r requests rps errors <<<"$out"
    record "$proto" "$target" max_rps "$rps"
    record "$proto" "$target" cpu_us_max "$(ns_per_request $((t1 - t0)) "$requests")"
    record "$proto" "$target" errors_max "$errors"

    local p50 p99
    t0=$(cpu_ns "$pid")
    out=$(run_oha "$proto" "$port" "$DURATION" "$base-rate.json")
    t1=$(cpu_ns "$pid")
    read -r requests p50 p99 errors <<<"$out"
    record "$proto" "$target" p50_ms "$p50"
    record "$proto" "$target" p99_ms "$p99"
    record "$proto" "$target" cpu_us_rate "$(ns_per_request $((t1 - t0)) "$requests")"
    record "$proto" "$target" errors_rate "$errors"
    log "  max $rps req/s; p50 ${p50} ms, p99 ${p99} ms at $RATE req/s"
}

# ---- the processes under test -----------------------------------------------------------
UPSTREAM_PID=""
start_upstream() {
    local cmd=(taskset -c "$SERVER_CPU" target/release/bench-upstream --listen "$HOST:$PORT_UPSTREAM")
    note_cmd "${cmd[@]}"
    start_bg "$TMP/upstream.log" "${cmd[@]}"
    UPSTREAM_PID=$LAST_PID
    wait_port "$UPSTREAM_PID" "$PORT_UPSTREAM" "$TMP/upstream.log"
}

# The OTLP sink of --observability: another bench-upstream, on the load generator's CPU (a
# collector runs elsewhere in a cluster). The exporter only checks the HTTP status.
COLLECTOR_PID=""
start_collector() {
    local cmd=(taskset -c "$LOADGEN_CPU" target/release/bench-upstream --listen "$HOST:$PORT_COLLECTOR")
    note_cmd "${cmd[@]}"
    start_bg "$TMP/collector.log" "${cmd[@]}"
    COLLECTOR_PID=$LAST_PID
    wait_port "$COLLECTOR_PID" "$PORT_COLLECTOR" "$TMP/collector.log"
}

# Value of an unlabelled sample on the proxy's /metrics.
proxy_metric() {
    curl -fsS "http://$HOST:$PORT_ADMIN/metrics" | awk -v m="$1" '$1 == m { print $2 }'
}

# $1: upstream protocol (http1|http2); $2: "policies" to enable every resilience policy with
# limits the benchmark never reaches, so each is evaluated on every request but none triggers;
# "tracing" for ratio-1.0 tracing exported over OTLP/HTTP; "accesslog" for the JSON access log.
PROXY_PID=""
start_proxy() {
    local policy="$TMP/policy-$1${2:+-$2}.yaml"
    {
        echo "# Generated by benches/load.sh: Host \`bench\` -> bench-upstream over $1${2:+, with $2}."
        bench_policy "$1" "${2:-}"
    } >"$policy"
    local cmd=(taskset -c "$SERVER_CPU" target/release/outrider-proxy --policy "$policy" --workers 1
        --outbound "$HOST:$PORT_OUTBOUND" --inbound "$HOST:$PORT_INBOUND" --admin "$HOST:$PORT_ADMIN"
        --drain-timeout 2s)
    note_cmd "${cmd[@]}"
    # Its output (the access log of the (l) runs) goes to another directory than the policy
    # file's: the proxy watches that directory, and would wake on every write to the log.
    mkdir -p "$TMP/out"
    start_bg "$TMP/out/proxy-$1.log" "${cmd[@]}"
    PROXY_PID=$LAST_PID
    wait_port "$PROXY_PID" "$PORT_OUTBOUND" "$TMP/out/proxy-$1.log"
    curl -fsS -o /dev/null "http://$HOST:$PORT_ADMIN/ready" || die "outrider-proxy is not ready"
    local got
    got=$(curl -fsS -H "Host: bench" "http://$HOST:$PORT_OUTBOUND/") || die "no 200 through outrider-proxy"
    [[ $got == "hello, world" ]] || die "unexpected body through outrider-proxy: $got"
}

write_nginx_conf() {
    mkdir -p "$TMP/nginx"
    nginx_conf "$TMP/nginx" "listen $HOST:$PORT_NGINX_H1; listen $HOST:$PORT_NGINX_H2 http2;" \
        >"$TMP/nginx/nginx.conf"
}

NGINX_PID=""         # master
NGINX_WORKER_PID=""  # the one worker: the process measured
start_nginx() {
    local dir=$TMP/nginx
    local cmd=(taskset -c "$SERVER_CPU" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log")
    note_cmd "${cmd[@]}"
    start_bg "$TMP/nginx.log" "${cmd[@]}"
    NGINX_PID=$LAST_PID
    wait_port "$NGINX_PID" "$PORT_NGINX_H1" "$TMP/nginx.log"
    wait_port "$NGINX_PID" "$PORT_NGINX_H2" "$TMP/nginx.log"
    NGINX_WORKER_PID=""
    for _ in $(seq 50); do
        read -r NGINX_WORKER_PID _ <"/proc/$NGINX_PID/task/$NGINX_PID/children" || true
        [[ -n $NGINX_WORKER_PID ]] && break
        sleep 0.05
    done
    [[ -n $NGINX_WORKER_PID ]] || die "nginx started no worker: $(tail -5 "$dir/logs/error.log")"
    PIDS+=("$NGINX_WORKER_PID")
    local got
    got=$(curl -fsS -H "Host: bench" "http://$HOST:$PORT_NGINX_H1/") || die "no 200 through nginx"
    [[ $got == "hello, world" ]] || die "unexpected body through nginx: $got"
}

stop_nginx() {
    stop_pid "$NGINX_PID"
    stop_pid "$NGINX_WORKER_PID"
}

# ---- one round --------------------------------------------------------------------------
run_round() {
    local proto up_kb
    for proto in h1 h2; do
        start_upstream
        if ((!POLICIES_ONLY)); then
            up_kb=$(status_kb "$UPSTREAM_PID" VmRSS)
            record "$proto" direct idle_rss_kb "$up_kb"
            measure "$proto" direct "$PORT_UPSTREAM" "$UPSTREAM_PID"
            record "$proto" direct peak_rss_kb "$(status_kb "$UPSTREAM_PID" VmHWM)"
        fi

        # Outrider, then Outrider with every policy on (same upstream protocol as the client);
        # for h2c also with an HTTP/1.1 upstream (what nginx does).
        local variants=(http1:outrider http1:outrider-policies) variant target
        [[ $proto == h2 ]] && variants=(http2:outrider http2:outrider-policies http1:outrider-h1up)
        ((POLICIES_ONLY)) && variants=("${variants[@]:0:2}")
        if ((OBSERVABILITY)); then
            local up=http1
            [[ $proto == h2 ]] && up=http2
            variants=("$up:outrider" "$up:outrider-tracing" "$up:outrider-accesslog")
            [[ -n $COLLECTOR_PID ]] || start_collector
        fi
        if ((ROUTES)); then
            local up=http1
            [[ $proto == h2 ]] && up=http2
            variants=("$up:outrider" "$up:outrider-routes100")
        fi
        for variant in "${variants[@]}"; do
            target=${variant#*:}
            variant=${variant%%:*}
            local with=""
            [[ $target == outrider-policies ]] && with=policies
            [[ $target == outrider-tracing ]] && with=tracing
            [[ $target == outrider-accesslog ]] && with=accesslog
            [[ $target == outrider-routes100 ]] && with=routes100
            start_proxy "$variant" $with
            record "$proto" "$target" idle_rss_kb "$(status_kb "$PROXY_PID" VmRSS)"
            measure "$proto" "$target" "$PORT_OUTBOUND" "$PROXY_PID"
            record "$proto" "$target" peak_rss_kb "$(status_kb "$PROXY_PID" VmHWM)"
            if [[ $with == tracing ]]; then
                local exported dropped
                exported=$(proxy_metric outrider_spans_exported_total)
                dropped=$(proxy_metric outrider_spans_dropped_total)
                record "$proto" "$target" spans_exported "${exported:-0}"
                record "$proto" "$target" spans_dropped "${dropped:-0}"
                log "  spans exported ${exported:-?}, dropped ${dropped:-?}"
            elif [[ $with == accesslog ]]; then
                local lines dropped
                lines=$(proxy_metric outrider_access_log_lines_total)
                dropped=$(proxy_metric outrider_access_log_dropped_total)
                record "$proto" "$target" log_lines "${lines:-0}"
                record "$proto" "$target" log_dropped "${dropped:-0}"
                log "  access-log lines ${lines:-?}, dropped ${dropped:-?}"
            fi
            stop_pid "$PROXY_PID"
        done

        if ((POLICIES_ONLY)); then
            stop_pid "$UPSTREAM_PID"
            continue
        fi
        start_nginx
        record "$proto" nginx idle_rss_kb "$(status_kb "$NGINX_WORKER_PID" VmRSS)"
        local nginx_port=$PORT_NGINX_H1
        [[ $proto == h2 ]] && nginx_port=$PORT_NGINX_H2
        measure "$proto" nginx "$nginx_port" "$NGINX_WORKER_PID"
        record "$proto" nginx peak_rss_kb "$(status_kb "$NGINX_WORKER_PID" VmHWM)"
        stop_nginx
        stop_pid "$UPSTREAM_PID"
    done
}

# ---- --mtls: two sidecars, the control plane, new connections -------------------------------
# Layout: wrk -> proxy A outbound (plain HTTP/1.1) -> proxy B inbound -> bench-upstream, A, B
# and the upstream on the server CPU; outrider-control (CA and policy) and the generators on
# the load-generator CPU. Variants: `plain` (A's service without tls, B's inbound permissive)
# and `mtls` (A's service `tls: mesh` expecting B's identity, B's inbound strict). Both
# proxies hold a certificate in both variants; only the path's security differs.
CONTROL_PID=""
CONTROL_DIR=""
PROXY_A_PID=""
PROXY_B_PID=""

# Writes the four workload documents (a workload per side and variant, so no proxy ever sees
# another variant's policy) and starts the control plane; it generates the CA into its state
# directory on first start.
start_control() {
    CONTROL_DIR=$TMP/control
    mkdir -p "$CONTROL_DIR/policies"
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$CONTROL_DIR/token")
    local variant mtls tls
    for variant in plain mtls; do
        mtls=permissive tls=""
        [[ $variant == mtls ]] && mtls=strict tls="
    tls: mesh
    identity: $SERVER_ID"
        cat >"$CONTROL_DIR/policies/server-$variant.yaml" <<YAML
# Generated by benches/load.sh --mtls: proxy B, in front of bench-upstream.
workload: server-$variant
inbound:
  app: $HOST:$PORT_UPSTREAM
  protocol: http1
  mtls: $mtls
YAML
        cat >"$CONTROL_DIR/policies/client-$variant.yaml" <<YAML
# Generated by benches/load.sh --mtls: proxy A, Host \`bench\` -> proxy B's inbound port.
workload: client-$variant
services:
  bench:
    endpoints: [$HOST:$PORT_B_INBOUND]
    protocol: http1$tls
routes:
  - name: bench
    match: { authority: bench }
    service: bench
YAML
    done
    local cmd=(taskset -c "$LOADGEN_CPU" target/release/outrider-control serve
        --policies "$CONTROL_DIR/policies" --state "$CONTROL_DIR/state" --listen "$HOST:$PORT_CONTROL"
        --token-file "$CONTROL_DIR/token" --workers 1)
    note_cmd "${cmd[@]}"
    start_bg "$TMP/control.log" "${cmd[@]}"
    CONTROL_PID=$LAST_PID
    wait_port "$CONTROL_PID" "$PORT_CONTROL" "$TMP/control.log"
    [[ -s $CONTROL_DIR/state/ca.crt ]] || die "outrider-control generated no CA in $CONTROL_DIR/state: $(tail -5 "$TMP/control.log")"
}

# Polls the admin /ready of process $1 on port $2 until 200 (policy and certificate held).
wait_ready() {
    local pid=$1 port=$2 logfile=$3
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || die "process $pid exited before ready: $(tail -5 "$logfile")"
        curl -fsS -o /dev/null "http://$HOST:$port/ready" 2>/dev/null && return 0
        sleep 0.1
    done
    die "not ready after 15 s (pid $pid, admin $port): $(curl -sS "http://$HOST:$port/ready" 2>&1); $(tail -5 "$logfile")"
}

# Starts proxy $1 (A: the caller, service account `client`; B: the callee, `server`) for
# variant $2 with its policy and certificate from the control plane; sets LAST_PID.
start_mesh_proxy() {
    local side=$1 variant=$2 sa out in admin
    if [[ $side == A ]]; then
        sa=client out=$PORT_OUTBOUND in=$PORT_INBOUND admin=$PORT_ADMIN
    else
        sa=server out=$PORT_B_OUTBOUND in=$PORT_B_INBOUND admin=$PORT_B_ADMIN
    fi
    local workload=$sa-$variant logfile=$TMP/proxy-$side-$variant.log
    local cmd=(taskset -c "$SERVER_CPU" target/release/outrider-proxy --control "http://$HOST:$PORT_CONTROL"
        --token-file "$CONTROL_DIR/token" --workload "$workload" --namespace "$MESH_NS" --service-account "$sa"
        --workers 1 --outbound "$HOST:$out" --inbound "$HOST:$in" --admin "$HOST:$admin" --drain-timeout 2s)
    note_cmd "${cmd[@]}"
    start_bg "$logfile" "${cmd[@]}"
    local pid=$LAST_PID
    wait_port "$pid" "$admin" "$logfile"
    wait_ready "$pid" "$admin" "$logfile"
    LAST_PID=$pid
}

# The path works, and is what the variant says: a 200 through A; B's inbound serves plaintext
# when permissive and refuses it when strict (so A's 200 in the mtls variant crossed mTLS).
check_mesh_path() {
    local variant=$1 got
    got=$(curl -fsS -m 5 -H "Host: bench" "http://$HOST:$PORT_OUTBOUND/") ||
        die "no 200 through proxy A -> proxy B ($variant): $(tail -3 "$TMP/proxy-A-$variant.log")"
    [[ $got == "hello, world" ]] || die "unexpected body through A -> B ($variant): $got"
    if [[ $variant == mtls ]]; then
        if curl -fsS -m 5 -o /dev/null -H "Host: bench" "http://$HOST:$PORT_B_INBOUND/" 2>/dev/null; then
            die "proxy B's inbound served plaintext although its policy says mtls: strict"
        fi
    else
        curl -fsS -m 5 -o /dev/null -H "Host: bench" "http://$HOST:$PORT_B_INBOUND/" ||
            die "proxy B's permissive inbound refused plaintext"
    fi
}

# CPU µs per unit: $1 clock ticks over $2 units.
per_unit() { awk -v d="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", n ? d * 1e6 / hz / n : 0 }'; }
# Percent of one CPU: $1 clock ticks over $2 microseconds.
busy_pct() { awk -v d="$1" -v us="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", us ? d / hz * 1e8 / us : 0 }'; }

# "busy total" jiffies of CPU $1 from /proc/stat, every process on it counted (busy excludes
# idle and iowait).
cpu_jiffies() {
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}
# Percent busy of a CPU between two cpu_jiffies readings.
cpu_busy_pct() {
    local busy0 total0 busy1 total1
    read -r busy0 total0 <<<"$1"
    read -r busy1 total1 <<<"$2"
    awk -v b=$((busy1 - busy0)) -v t=$((total1 - total0)) 'BEGIN { printf "%.1f", t ? b * 100 / t : 0 }'
}

# Percent of the server CPU used by processes other than ours between two cpu_jiffies readings
# $1 and $2, ours having used $3 clock ticks (/proc/stat counts in the same USER_HZ ticks).
busy_other() {
    local busy0 total0 busy1 total1
    read -r busy0 total0 <<<"$1"
    read -r busy1 total1 <<<"$2"
    awk -v b=$((busy1 - busy0 - $3)) -v t=$((total1 - total0)) 'BEGIN { if (b < 0) b = 0; printf "%.1f", t ? b * 100 / t : 0 }'
}

# Sum of a labelled counter on the admin port $1 (every series of metric $2).
metric_sum() {
    curl -fsS "http://$HOST:$1/metrics" | awk -v m="$2" 'index($1, m "{") == 1 || $1 == m { s += $2 } END { print s + 0 }'
}

# Keep-alive: wrk's 64 connections to A's outbound, A pooling its connections to B.
measure_keepalive() {
    local variant=$1 base="$TMP/r$ROUND-ka-$1"
    log "round $ROUND $variant keep-alive: warm-up ${WARMUP}s, max ${DURATION}s (wrk -> A -> B -> upstream)"
    run_wrk "$PORT_OUTBOUND" "$WARMUP" "$base-warmup.txt" >/dev/null
    local a0 b0 u0 a1 b1 u1 s0 s1 out requests rps errors
    s0=$(cpu_jiffies "$SERVER_CPU")
    a0=$(cpu_ticks "$PROXY_A_PID")
    b0=$(cpu_ticks "$PROXY_B_PID")
    u0=$(cpu_ticks "$UPSTREAM_PID")
    out=$(run_wrk "$PORT_OUTBOUND" "$DURATION" "$base-max.txt")
    a1=$(cpu_ticks "$PROXY_A_PID")
    b1=$(cpu_ticks "$PROXY_B_PID")
    u1=$(cpu_ticks "$UPSTREAM_PID")
    s1=$(cpu_jiffies "$SERVER_CPU")
    read -r requests rps errors <<<"$out"
    ((requests > 0)) || die "wrk completed no request through A -> B ($variant): $(tail -5 "$base-max.txt")"
    record ka "$variant" max_rps "$rps"
    record ka "$variant" cpu_us_a "$(per_unit $((a1 - a0)) "$requests")"
    record ka "$variant" cpu_us_b "$(per_unit $((b1 - b0)) "$requests")"
    record ka "$variant" cpu_us_ab "$(per_unit $((a1 - a0 + b1 - b0)) "$requests")"
    record ka "$variant" errors "$errors"
    record ka "$variant" busy_server_cpu "$(cpu_busy_pct "$s0" "$s1")"
    record ka "$variant" busy_other "$(busy_other "$s0" "$s1" $((a1 - a0 + b1 - b0 + u1 - u0)))"
    local conns
    conns=$(metric_sum "$PORT_ADMIN" outrider_upstream_connections_opened_total)
    record ka "$variant" a_to_b_conns "$conns"
    log "  $rps req/s; A+B $(per_unit $((a1 - a0 + b1 - b0)) "$requests") CPU µs/req; A opened $conns connections to B"
}

# Runs bench-connect against B's inbound for variant $1 ($2 seconds, raw output in $3).
# Prints "ok errors duration_us cpu_ticks tls suite group alpn peer".
run_connect() {
    local variant=$1 secs=$2 out=$3
    local args=(--target "$HOST:$PORT_B_INBOUND" --duration "$secs" --concurrency "$CONNECT_WORKERS" --host bench)
    [[ $variant == mtls ]] && args+=(--mtls --control "http://$HOST:$PORT_CONTROL" --token-file "$CONTROL_DIR/token"
        --namespace "$MESH_NS" --service-account client --expect "$SERVER_ID")
    gen target/release/bench-connect "${args[@]}" >"$out" 2>"$out.err" ||
        die "bench-connect failed: $(tail -5 "$out.err")"
    awk '/^CONNECT / {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%d %d %d %d %s %s %s %s %s\n", v["ok"], v["errors"], v["duration_us"], v["cpu_ticks"],
            v["tls"], v["suite"], v["group"], v["alpn"], v["peer"]
        found = 1
    } END { if (!found) exit 1 }' "$out" || die "cannot parse bench-connect output: $(tail -5 "$out" "$out.err")"
}

NEGOTIATED=""   # file: what the mTLS handshakes negotiated, one line per run
# New connections: bench-connect, one request per connection, straight to B's inbound.
measure_connect() {
    local variant=$1 base="$TMP/r$ROUND-conn-$1"
    log "round $ROUND $variant new connections: warm-up ${WARMUP}s, ${DURATION}s of $CONNECT_WORKERS workers -> B inbound"
    run_connect "$variant" "$WARMUP" "$base-warmup.txt" >/dev/null
    local a0 b0 u0 a1 b1 u1 s0 s1 out ok errors us ticks tls suite group alpn peer
    s0=$(cpu_jiffies "$SERVER_CPU")
    a0=$(cpu_ticks "$PROXY_A_PID")
    b0=$(cpu_ticks "$PROXY_B_PID")
    u0=$(cpu_ticks "$UPSTREAM_PID")
    out=$(run_connect "$variant" "$DURATION" "$base.txt")
    a1=$(cpu_ticks "$PROXY_A_PID")
    b1=$(cpu_ticks "$PROXY_B_PID")
    u1=$(cpu_ticks "$UPSTREAM_PID")
    s1=$(cpu_jiffies "$SERVER_CPU")
    read -r ok errors us ticks tls suite group alpn peer <<<"$out"
    ((ok > 0)) || die "bench-connect completed no connection to B's inbound ($variant): $(tail -5 "$base.txt.err")"
    record conn "$variant" conns_per_s "$(awk -v n="$ok" -v us="$us" 'BEGIN { printf "%.1f", us ? n * 1e6 / us : 0 }')"
    record conn "$variant" cpu_us_b "$(per_unit $((b1 - b0)) "$ok")"
    record conn "$variant" busy_b "$(busy_pct $((b1 - b0)) "$us")"
    record conn "$variant" busy_gen "$(busy_pct "$ticks" "$us")"
    record conn "$variant" errors "$errors"
    record conn "$variant" busy_server_cpu "$(cpu_busy_pct "$s0" "$s1")"
    record conn "$variant" busy_other "$(busy_other "$s0" "$s1" $((a1 - a0 + b1 - b0 + u1 - u0)))"
    if [[ $variant == mtls ]]; then
        echo "$tls $suite $group $alpn $peer" >>"$NEGOTIATED"
        [[ $peer == "$SERVER_ID" ]] || die "bench-connect's mTLS peer was $peer, not $SERVER_ID"
    fi
    log "  $(awk -v n="$ok" -v us="$us" 'BEGIN { printf "%.0f", us ? n * 1e6 / us : 0 }') conns/s, B $(per_unit $((b1 - b0)) "$ok") CPU µs/conn, $errors errors$([[ $variant == mtls ]] && echo ", $tls $suite $group")"
}

run_round_mtls() {
    local variant
    for variant in plain mtls; do
        start_upstream
        start_mesh_proxy B "$variant"
        PROXY_B_PID=$LAST_PID
        start_mesh_proxy A "$variant"
        PROXY_A_PID=$LAST_PID
        check_mesh_path "$variant"
        measure_keepalive "$variant"
        measure_connect "$variant"
        stop_pid "$PROXY_A_PID"
        stop_pid "$PROXY_B_PID"
        stop_pid "$UPSTREAM_PID"
    done
}

# ---- --capture: transparent capture against the explicit mode -------------------------------
# Layout: two network namespaces joined by a veth pair, documentation addresses only. The pod
# (192.0.2.1) holds wrk and outrider-proxy (as UID 65532 with the rules of `outrider-proxy
# init`); the upstream namespace (192.0.2.2) holds bench-upstream on port 8080. The same proxy
# process serves both variants, so they differ only in how a request reaches it:
#   explicit: wrk -> 127.0.0.1:15001 (loopback is never captured), Host bench
#   captured: wrk -> 192.0.2.2:8080, redirected to 127.0.0.1:15001 by the output chain; the
#             proxy reads the original destination and detects HTTP/1.1, Host bench
# In both, the proxy's connections to 192.0.2.2:8080 leave as UID 65532, exempt from the rules.
# Each variant is measured keep-alive (wrk's 64 connections) and with a new connection per
# request (`Connection: close`): capture costs per connection, not per request.
CAP_POD=""
CAP_UP=""
CAP_POD_IP=192.0.2.1
CAP_UP_IP=192.0.2.2
CAP_UP_PORT=8080
CAP_PROXY_UID=65532
# The proxy's ports in the pod: where `outrider-proxy init` (defaults) redirects.
CAP_OUTBOUND=15001
CAP_INBOUND=15006
CAP_ADMIN=15000

# In namespace $1: "$@".
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# Waits until something accepts on $3:$4 in namespace $2 while process $1 lives (log $5).
ns_wait_port() {
    local pid=$1 ns=$2 addr=$3 port=$4 logfile=$5
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || die "process $pid exited before listening on $addr:$port: $(tail -5 "$logfile")"
        if in_ns "$ns" bash -c "exec 3<>/dev/tcp/$addr/$port" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    die "nothing listens on $addr:$port in $ns after 5 s (pid $pid): $(tail -5 "$logfile")"
}

setup_capture_pods() {
    CAP_POD=olb$$-pod
    CAP_UP=olb$$-up
    ip netns add "$CAP_POD" && NETNS+=("$CAP_POD")
    ip netns add "$CAP_UP" && NETNS+=("$CAP_UP")
    ip -n "$CAP_POD" link add eth0 type veth peer name eth0 netns "$CAP_UP"
    ip -n "$CAP_POD" addr add "$CAP_POD_IP/24" dev eth0
    ip -n "$CAP_UP" addr add "$CAP_UP_IP/24" dev eth0
    local ns
    for ns in "$CAP_POD" "$CAP_UP"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
    local cmd=(target/release/outrider-proxy init)
    note_cmd ip netns exec '$POD' "${cmd[@]}"
    in_ns "$CAP_POD" "${cmd[@]}" >"$TMP/init.log" 2>&1 || die "outrider-proxy init failed: $(tail -5 "$TMP/init.log")"
    in_ns "$CAP_POD" "${cmd[@]}" --dry-run >"$TMP/rules.txt" 2>&1 || true

    # The proxy reads its policy as its own UID.
    chmod 755 "$TMP"
    {
        echo "# Generated by benches/load.sh --capture: Host \`bench\` (explicit) or the upstream's"
        echo "# address (captured) -> bench-upstream in the other namespace."
        cat <<YAML
services:
  bench:
    endpoints: [$CAP_UP_IP:$CAP_UP_PORT]
    protocol: http1
routes:
  - name: bench
    match: { authority: bench }
    service: bench
YAML
    } >"$TMP/policy-capture.yaml"
    chmod 644 "$TMP/policy-capture.yaml"
}

# Starts bench-upstream in the upstream namespace and the proxy in the pod (sets UPSTREAM_PID,
# PROXY_PID), and checks both paths answer.
start_capture_processes() {
    local cmd=(taskset -c "$SERVER_CPU" target/release/bench-upstream --listen "$CAP_UP_IP:$CAP_UP_PORT")
    note_cmd ip netns exec '$UPSTREAM_NS' "${cmd[@]}"
    start_bg "$TMP/upstream.log" ip netns exec "$CAP_UP" "${cmd[@]}"
    UPSTREAM_PID=$LAST_PID
    ns_wait_port "$UPSTREAM_PID" "$CAP_UP" "$CAP_UP_IP" "$CAP_UP_PORT" "$TMP/upstream.log"

    cmd=(taskset -c "$SERVER_CPU" setpriv --reuid "$CAP_PROXY_UID" --regid "$CAP_PROXY_UID" --clear-groups
        target/release/outrider-proxy --policy "$TMP/policy-capture.yaml" --workers 1
        --outbound "127.0.0.1:$CAP_OUTBOUND" --inbound "0.0.0.0:$CAP_INBOUND" --admin "127.0.0.1:$CAP_ADMIN"
        --drain-timeout 2s)
    note_cmd ip netns exec '$POD' "${cmd[@]}"
    start_bg "$TMP/proxy-capture.log" ip netns exec "$CAP_POD" "${cmd[@]}"
    PROXY_PID=$LAST_PID
    ns_wait_port "$PROXY_PID" "$CAP_POD" 127.0.0.1 "$CAP_OUTBOUND" "$TMP/proxy-capture.log"
    local got
    got=$(in_ns "$CAP_POD" curl -fsS -m 5 -H "Host: bench" "http://127.0.0.1:$CAP_OUTBOUND/") ||
        die "no 200 through the proxy (explicit): $(tail -3 "$TMP/proxy-capture.log")"
    [[ $got == "hello, world" ]] || die "unexpected body (explicit): $got"
    got=$(in_ns "$CAP_POD" curl -fsS -m 5 -H "Host: bench" "http://$CAP_UP_IP:$CAP_UP_PORT/") ||
        die "no 200 through the proxy (captured): $(tail -3 "$TMP/proxy-capture.log")"
    [[ $got == "hello, world" ]] || die "unexpected body (captured): $got"
}

# Sum of every sample of metric $1 whose labels contain $2, from the proxy's /metrics.
capture_metric() {
    in_ns "$CAP_POD" curl -fsS -m 5 "http://127.0.0.1:$CAP_ADMIN/metrics" |
        awk -v m="$1" -v l="$2" '(index($1, m "{") == 1 || $1 == m) && index($1, l) { s += $2 } END { print s + 0 }'
}

# wrk in the pod against $1 (URL) for $2 seconds, output to $3, extra wrk args after. Prints
# "requests rps errors".
run_wrk_pod() {
    local url=$1 secs=$2 out=$3
    shift 3
    local cmd=(timeout --foreground -k 5 $((secs + 60)) taskset -c "$LOADGEN_CPU"
        wrk -t1 -c"$H1_CONNS" -d"${secs}s" -H "Host: bench" "$@" -s "$WRK_LUA" "$url")
    note_cmd ip netns exec '$POD' "${cmd[@]}"
    in_ns "$CAP_POD" "${cmd[@]}" >"$out" 2>&1 || die "wrk failed: $(tail -5 "$out")"
    awk '/^WRK / {
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%d %.1f %d\n", v["requests"], v["requests"] / (v["duration_us"] / 1e6),
            v["status"] + v["connect"] + v["read"] + v["write"] + v["timeout"]
    }' "$out"
}

# One variant: $1 explicit|captured, $2 ka|close.
measure_capture() {
    local variant=$1 conns=$2 base="$TMP/r$ROUND-$1-$2" url extra=()
    url="http://127.0.0.1:$CAP_OUTBOUND/"
    [[ $variant == captured ]] && url="http://$CAP_UP_IP:$CAP_UP_PORT/"
    [[ $conns == close ]] && extra=(-H "Connection: close")
    log "round $ROUND $variant $conns: warm-up ${WARMUP}s, max ${DURATION}s ($url)"
    run_wrk_pod "$url" "$WARMUP" "$base-warmup.txt" "${extra[@]}" >/dev/null
    local t0 t1 u0 u1 c0 c1 out requests rps errors
    c0=$(capture_metric outrider_tcp_connections_total 'destination="bench"')
    t0=$(cpu_ns "$PROXY_PID")
    u0=$(cpu_ns "$UPSTREAM_PID")
    out=$(run_wrk_pod "$url" "$DURATION" "$base-max.txt" "${extra[@]}")
    t1=$(cpu_ns "$PROXY_PID")
    u1=$(cpu_ns "$UPSTREAM_PID")
    c1=$(capture_metric outrider_tcp_connections_total 'destination="bench"')
    read -r requests rps errors <<<"$out"
    ((requests > 0)) || die "wrk completed no request ($variant $conns): $(tail -5 "$base-max.txt")"
    record "$conns" "$variant" max_rps "$rps"
    record "$conns" "$variant" cpu_us "$(ns_per_request $((t1 - t0)) "$requests")"
    record "$conns" "$variant" upstream_cpu_us "$(ns_per_request $((u1 - u0)) "$requests")"
    record "$conns" "$variant" errors "$errors"
    record "$conns" "$variant" captured_conns "$(awk -v a="$c0" -v b="$c1" 'BEGIN { print b - a }')"
    log "  $rps req/s; proxy $(ns_per_request $((t1 - t0)) "$requests") CPU µs/req; $errors errors"
}

run_round_capture() {
    start_capture_processes
    # Alternating the order each round spreads any drift of the machine over both variants.
    local order=(explicit captured) conns variant
    ((ROUND % 2 == 0)) && order=(captured explicit)
    for conns in ka close; do
        for variant in "${order[@]}"; do
            measure_capture "$variant" "$conns"
        done
    done
    stop_pid "$PROXY_PID"
    stop_pid "$UPSTREAM_PID"
}

report_capture() {
    local errors_total=0
    {
        echo "# Outrider load benchmark: transparent capture against the explicit mode"
        echo
        echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') by \`bash benches/load.sh$INVOCATION\`:" \
            "$ROUNDS round(s), medians shown; each run ${DURATION} s after a ${WARMUP} s warm-up."
        echo
        echo "- Machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)," \
            "$(awk '/^MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
        echo "- Outrider: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- proxy config 2>/dev/null || echo ' (+ uncommitted changes)')$( ((NO_BUILD)) && echo ' (--no-build: the binaries in target/release as they were, possibly older than this commit)'), release build," \
            "\`--workers 1\`, default log level, as UID $CAP_PROXY_UID; $(wrk -v 2>&1 | awk 'NR == 1 { print $1, $2 }')"
        echo "- Layout: two network namespaces joined by a veth pair. The pod ($CAP_POD_IP) runs wrk (CPU" \
            "$LOADGEN_CPU) and the proxy (CPU $SERVER_CPU) with the rules \`outrider-proxy init\` installed" \
            "(its defaults; mode: $(awk '/^table inet outrider/ { print "nft"; exit } /^\*nat/ { print "iptables"; exit }' "$TMP/rules.txt"))." \
            "bench-upstream listens on $CAP_UP_IP:$CAP_UP_PORT in the other namespace (CPU $SERVER_CPU)."
        echo "- **explicit**: wrk calls the outbound port \`127.0.0.1:$CAP_OUTBOUND\` (loopback is not" \
            "captured). **captured**: wrk calls \`$CAP_UP_IP:$CAP_UP_PORT\`; the output chain redirects it" \
            "to the same port, and the proxy reads the original destination and detects HTTP/1.1. Both" \
            "send \`Host: bench\`, the same route and service; the same proxy process serves both."
        echo "- Keep-alive: \`wrk -t1 -c$H1_CONNS\`. New connection per request: the same with" \
            "\`Connection: close\` (wrk reconnects for each request)."
        echo "- CPU µs/req: run time of the proxy, all its threads (/proc/PID/task/*/schedstat), over" \
            "the run, divided by the requests completed. The redirect itself runs in the kernel in" \
            "wrk's context (the output chain), so it is not in the proxy's figure; the proxy's share" \
            "of capture is reading the original destination and detecting the protocol."
        echo
        echo "| Measure | explicit | captured | captured / explicit |"
        echo "|---|---:|---:|---:|"
        crow() {
            local e c
            e=$(median "$2" explicit "$3")
            c=$(median "$2" captured "$3")
            echo "| $1 | $(fmt "$e" "$4") | $(fmt "$c" "$4") | $(ratio "$c" "$e") |"
        }
        crow "Keep-alive: max req/s" ka max_rps '%.0f'
        crow "Keep-alive: proxy CPU µs/req" ka cpu_us '%.2f'
        crow "Keep-alive: bench-upstream CPU µs/req" ka upstream_cpu_us '%.2f'
        crow "New connection per request: max req/s" close max_rps '%.0f'
        crow "New connection per request: proxy CPU µs/req" close cpu_us '%.2f'
        crow "New connection per request: bench-upstream CPU µs/req" close upstream_cpu_us '%.2f'
        local v e
        for v in ka close; do
            for e in explicit captured; do
                errors_total=$((errors_total + $(total "$v" "$e" errors)))
            done
        done
        echo "| Errors (all rounds) | $(($(total ka explicit errors) + $(total close explicit errors))) |" \
            "$(($(total ka captured errors) + $(total close captured errors))) | |"
        echo "| Captured connections counted by the proxy (\`outrider_tcp_connections_total\`, sum over rounds) |" \
            "$(($(total ka explicit captured_conns) + $(total close explicit captured_conns))) |" \
            "$(($(total ka captured captured_conns) + $(total close captured captured_conns))) | |"
        echo
        local ka close_ratio
        ka=$(ratio "$(median ka captured cpu_us)" "$(median ka explicit cpu_us)")
        close_ratio=$(ratio "$(median close captured cpu_us)" "$(median close explicit cpu_us)")
        echo "**Cost of capture.** Keep-alive: the proxy spends ${ka}x the explicit mode's CPU per" \
            "request (goal: at most 1.05). With a new connection per request: ${close_ratio}x (the" \
            "original-destination lookup and protocol detection are paid once per connection)."
        echo
        echo "## Per-round values"
        echo
        echo '```'
        echo "connections variant metric round value"
        sort -k1,1 -k2,2 -k3,3 -k4,4n "$RESULTS"
        echo '```'
        echo
        echo "## Commands"
        echo
        echo '```sh'
        echo "cargo build --release -p outrider-proxy -p outrider-benches --bins"
        awk '!seen[$0]++' "$COMMANDS" | sed "s|$TMP|\$TMP|g"
        echo '```'
        echo
        echo "<details><summary>Policy</summary>"
        echo
        echo '```yaml'
        cat "$TMP/policy-capture.yaml"
        echo '```'
        echo "</details>"
        echo
        echo "<details><summary>Rules (<code>outrider-proxy init --dry-run</code>)</summary>"
        echo
        echo '```'
        cat "$TMP/rules.txt"
        echo '```'
        echo "</details>"
    } >"$TMP/report.md"
    mkdir -p "$(dirname "$OUT")"
    cp "$TMP/report.md" "$OUT"
    cat "$TMP/report.md"
    log "report written to $OUT"
    if ((errors_total)); then
        KEEP_TMP=1
        die "$errors_total errors (report written anyway); see the per-round values and the raw output in $TMP"
    fi
}

# ---- report -----------------------------------------------------------------------------
# Median of metric $3 for proto $1, target $2 over all rounds.
median() {
    awk -v p="$1" -v t="$2" -v m="$3" '$1 == p && $2 == t && $3 == m { print $5 }' "$RESULTS" |
        sort -g | awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "nan"; exit }
            print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# Sum of metric $3 for proto $1, target $2 over all rounds.
total() {
    awk -v p="$1" -v t="$2" -v m="$3" '$1 == p && $2 == t && $3 == m { s += $5 } END { print s + 0 }' "$RESULTS"
}
mib() { awk -v v="$1" 'BEGIN { if (v == "nan") print "n/a"; else printf "%.1f", v / 1024 }'; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "nan") print "n/a"; else printf f, v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }
diff_ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
diff_us() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan") print "n/a"; else printf "%+.1f", a - b }'; }

label() {
    case "$1/$2" in
    h1/direct) echo "(a) direct to bench-upstream" ;;
    h1/outrider) echo "(b) through Outrider (HTTP/1.1 upstream)" ;;
    h1/outrider-policies) echo "(p) (b) with every policy on, none triggering" ;;
    */outrider-tracing) echo "(t) (b) with tracing ratio 1.0, OTLP/HTTP export" ;;
    */outrider-accesslog) echo "(l) (b) with the JSON access log on" ;;
    */outrider-routes100) echo "(r) (b) with its route among 100" ;;
    h1/nginx) echo "(c) through nginx (HTTP/1.1 upstream)" ;;
    h2/direct) echo "(a) direct to bench-upstream (h2c)" ;;
    h2/outrider) echo "(b) through Outrider, h2c upstream" ;;
    h2/outrider-policies) echo "(p) (b) with every policy on, none triggering" ;;
    h2/outrider-h1up) echo "(b') through Outrider, HTTP/1.1 upstream" ;;
    h2/nginx) echo "(c) through nginx (HTTP/1.1 upstream)" ;;
    esac
}

report() {
    local errors_total=0 proto target
    {
        echo "# Outrider load benchmark: latest figures"
        echo
        echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') by \`bash benches/load.sh$INVOCATION\`:" \
            "$ROUNDS round(s), medians shown; each run ${DURATION} s after a ${WARMUP} s warm-up."
        echo
        echo "- Machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)," \
            "$(awk '/^MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
        echo "- Pinning (a 1-CPU pod): load generator on CPU $LOADGEN_CPU; bench-upstream and the proxy" \
            "under test on CPU $SERVER_CPU (they share it). All traffic on 127.0.0.1."
        echo "- Outrider: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- proxy config 2>/dev/null || echo ' (+ uncommitted changes)'), release build, \`--workers 1\`," \
            "default log level;$(command -v nginx >/dev/null && echo " $(nginx -v 2>&1 | sed 's/^nginx version: //'), 1 worker;")" \
            "$(wrk -v 2>&1 | awk 'NR == 1 { print $1, $2 }'); $(h2load --version | head -1); $(oha --version)"
        echo "- HTTP/1.1: $H1_CONNS keep-alive connections. h2c (prior knowledge): $H2_CONNS connections x" \
            "$H2_STREAMS concurrent streams = 64 in flight."
        echo "- Max req/s: closed loop (wrk for HTTP/1.1, h2load for h2c). Latency: open loop at $RATE req/s" \
            "(oha \`-n $((RATE * DURATION)) -q $RATE --latency-correction\`, so queueing delay counts)."
        echo "- CPU µs/req: run time of the process under test, all its threads (/proc/PID/task/*/schedstat," \
            "in ns), over the run, divided by the requests completed. Process under test: outrider-proxy; the nginx" \
            "worker; for (a) bench-upstream itself."
        echo "- RSS: VmRSS right after start (idle) and VmHWM after all runs (peak) of that process."
        echo
        local w=(44 9 14 14 15 18 12 12 6)
        # One table row from its cells, padded to the column widths in `w`.
        row() {
            local i out="|" cells=("$@")
            for ((i = 0; i < $#; i++)); do
                if ((i == 0)); then
                    out+=$(printf ' %-*s |' "${w[i]}" "${cells[i]}")
                else
                    out+=$(printf ' %*s |' "${w[i]}" "${cells[i]}")
                fi
            done
            echo "$out"
        }
        row "Target" "Max req/s" "p50 ms @${RATE}/s" "p99 ms @${RATE}/s" "CPU us/req @max" \
            "CPU us/req @${RATE}/s" "Idle RSS MiB" "Peak RSS MiB" "Errors"
        local sep="|" i
        for ((i = 0; i < ${#w[@]}; i++)); do
            if ((i == 0)); then sep+=$(printf -- '-%.0s' $(seq $((w[i] + 2))))"|"; else sep+=$(printf -- '-%.0s' $(seq $((w[i] + 1))))":|"; fi
        done
        echo "$sep"
        for proto in h1 h2; do
            local targets=(direct outrider outrider-policies outrider-tracing outrider-accesslog outrider-routes100 nginx) name="HTTP/1.1"
            [[ $proto == h2 ]] && targets=(direct outrider outrider-policies outrider-tracing outrider-accesslog outrider-routes100 outrider-h1up nginx) name="h2c"
            row "**$name**" "" "" "" "" "" "" "" ""
            for target in "${targets[@]}"; do
                # Targets a --policies run skipped.
                [[ $(median "$proto" "$target" max_rps) == nan ]] && continue
                local errs
                errs=$(($(total "$proto" "$target" errors_max) + $(total "$proto" "$target" errors_rate)))
                errors_total=$((errors_total + errs))
                row "$(label "$proto" "$target")" \
                    "$(fmt "$(median "$proto" "$target" max_rps)" '%.0f')" \
                    "$(fmt "$(median "$proto" "$target" p50_ms)" '%.3f')" \
                    "$(fmt "$(median "$proto" "$target" p99_ms)" '%.3f')" \
                    "$(fmt "$(median "$proto" "$target" cpu_us_max)" '%.1f')" \
                    "$(fmt "$(median "$proto" "$target" cpu_us_rate)" '%.1f')" \
                    "$(mib "$(median "$proto" "$target" idle_rss_kb)")" \
                    "$(mib "$(median "$proto" "$target" peak_rss_kb)")" \
                    "$errs"
            done
        done
        echo
        echo "Errors: non-2xx responses + connect/read/write/timeout errors, summed over all rounds and runs."
        echo
        echo "## Ratios (medians)"
        echo
        echo "| Comparison | HTTP/1.1 | h2c, Outrider h2c upstream | h2c, Outrider HTTP/1.1 upstream |"
        echo "|---|---:|---:|---:|"
        local b row
        row="| Throughput (b)/(a) |"
        for b in h1:outrider h2:outrider h2:outrider-h1up; do
            row+=" $(ratio "$(median "${b%%:*}" "${b#*:}" max_rps)" "$(median "${b%%:*}" direct max_rps)") |"
        done
        echo "$row"
        row="| Throughput (b)/(c) |"
        for b in h1:outrider h2:outrider h2:outrider-h1up; do
            row+=" $(ratio "$(median "${b%%:*}" "${b#*:}" max_rps)" "$(median "${b%%:*}" nginx max_rps)") |"
        done
        echo "$row"
        row="| Added p50 latency (b)−(a), ms @$RATE/s |"
        for b in h1:outrider h2:outrider h2:outrider-h1up; do
            row+=" $(diff_ms "$(median "${b%%:*}" "${b#*:}" p50_ms)" "$(median "${b%%:*}" direct p50_ms)") |"
        done
        echo "$row"
        row="| Added p50 latency (c)−(a), ms @$RATE/s (nginx, for reference) |"
        for b in h1:nginx h2:nginx h2:nginx; do
            row+=" $(diff_ms "$(median "${b%%:*}" "${b#*:}" p50_ms)" "$(median "${b%%:*}" direct p50_ms)") |"
        done
        echo "$row"
        row="| CPU/request (b)/(c) at max load |"
        for b in h1:outrider h2:outrider h2:outrider-h1up; do
            row+=" $(ratio "$(median "${b%%:*}" "${b#*:}" cpu_us_max)" "$(median "${b%%:*}" nginx cpu_us_max)") |"
        done
        echo "$row"
        row="| CPU/request (b)/(c) at $RATE/s |"
        for b in h1:outrider h2:outrider h2:outrider-h1up; do
            row+=" $(ratio "$(median "${b%%:*}" "${b#*:}" cpu_us_rate)" "$(median "${b%%:*}" nginx cpu_us_rate)") |"
        done
        echo "$row"
        row="| Throughput (p)/(b): cost of every policy on, none triggering (goal ≥ 0.90) |"
        for b in h1 h2; do
            row+=" $(ratio "$(median "$b" outrider-policies max_rps)" "$(median "$b" outrider max_rps)") |"
        done
        echo "$row n/a |"
        if ((ROUTES)); then
            row="| Throughput (r)/(b): the route among 100 (goal ≥ 0.97) |"
            for p in h1 h2; do
                row+=" $(ratio "$(median "$p" outrider-routes100 max_rps)" "$(median "$p" outrider max_rps)") |"
            done
            echo "$row n/a |"
        fi
        if ((OBSERVABILITY)); then
            for b in tracing:"(t)/(b): tracing ratio 1.0, every span exported" accesslog:"(l)/(b): JSON access log on"; do
                row="| Throughput ${b#*:} |"
                for p in h1 h2; do
                    row+=" $(ratio "$(median "$p" "outrider-${b%%:*}" max_rps)" "$(median "$p" outrider max_rps)") |"
                done
                echo "$row n/a |"
            done
            echo
            echo "Spans exported / dropped, access-log lines / dropped (sum over rounds, whole run incl. warm-up):"
            echo
            for p in h1 h2; do
                echo "- $p: spans $(total "$p" outrider-tracing spans_exported) / $(total "$p" outrider-tracing spans_dropped);" \
                    "log lines $(total "$p" outrider-accesslog log_lines) / $(total "$p" outrider-accesslog log_dropped)"
            done
        fi
        echo
        echo "(b)/(a) cannot reach 1: the upstream and the proxy share CPU $SERVER_CPU, as in a pod."
        echo
        echo "## Per-round values"
        echo
        echo '```'
        echo "proto target metric round value"
        sort -k1,1 -k2,2 -k3,3 -k4,4n "$RESULTS"
        echo '```'
        echo
        echo "## Commands"
        echo
        echo '```sh'
        echo "cargo build --release -p outrider-proxy -p outrider-benches --bins"
        awk '!seen[$0]++' "$COMMANDS" | sed "s|$TMP|\$TMP|g"
        echo '```'
        echo
        echo "<details><summary>Outrider policy (HTTP/1.1 upstream; the h2c-upstream one says <code>protocol: http2</code>)</summary>"
        echo
        echo '```yaml'
        cat "$TMP/policy-http1.yaml"
        echo '```'
        echo "</details>"
        echo
        if [[ -f $TMP/policy-http1-policies.yaml ]]; then
            echo "<details><summary>Outrider policy of the (p) runs: every policy on, none triggering</summary>"
            echo
            echo '```yaml'
            cat "$TMP/policy-http1-policies.yaml"
            echo '```'
            echo "</details>"
        fi
        if [[ -f $TMP/policy-http1-tracing.yaml ]]; then
            echo
            echo "<details><summary>Outrider policy of the (t) runs</summary>"
            echo
            echo '```yaml'
            cat "$TMP/policy-http1-tracing.yaml"
            echo '```'
            echo "</details>"
        fi
        if ((!POLICIES_ONLY)); then
            echo
            echo "<details><summary>nginx.conf</summary>"
            echo
            echo '```nginx'
            sed "s|$TMP|\$TMP|g" "$TMP/nginx/nginx.conf"
            echo '```'
            echo "</details>"
        fi
    } >"$TMP/report.md"
    mkdir -p "$(dirname "$OUT")"
    cp "$TMP/report.md" "$OUT"
    cat "$TMP/report.md"
    log "report written to $OUT"
    if ((errors_total)); then
        KEEP_TMP=1
        log "WARNING: $errors_total errors/non-2xx responses; see the per-round values and the raw output in $TMP"
    fi
}

# The --mtls report.
report_mtls() {
    local errors_total=0
    {
        echo "# Outrider load benchmark: mesh mTLS vs plaintext between two sidecars"
        echo
        echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') by \`bash benches/load.sh$INVOCATION\`:" \
            "$ROUNDS round(s), medians shown; each run ${DURATION} s after a ${WARMUP} s warm-up."
        echo
        echo "- Machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)," \
            "$(awk '/^MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
        echo "- Outrider: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- proxy config control benches/src 2>/dev/null || echo ' (+ uncommitted changes)'), release build," \
            "both proxies \`--workers 1\`, default log level; $(wrk -v 2>&1 | awk 'NR == 1 { print $1, $2 }')"
        echo "- Path: wrk -> proxy A outbound (plain HTTP/1.1, $H1_CONNS keep-alive connections) -> proxy B inbound" \
            "-> bench-upstream; A -> B is HTTP/1.1 (\`protocol: http1\`), pooled by A."
        echo "- Pinning: wrk, bench-connect and outrider-control on CPU $LOADGEN_CPU; proxy A, proxy B and" \
            "bench-upstream share CPU $SERVER_CPU. All traffic on 127.0.0.1."
        echo "- **plaintext**: A's service without \`tls\`, B's inbound \`mtls: permissive\`. **mTLS**: A's service" \
            "\`tls: mesh\` with \`identity: $SERVER_ID\`, B's inbound \`mtls: strict\` (checked: B refuses" \
            "plaintext, and a request through A gets 200). Both proxies hold a certificate from the real" \
            "outrider-control (CA generated at its first start) in both variants."
        local negotiated
        negotiated=$(sort -u "$NEGOTIATED" | awk '{ printf "%s%s, %s, key exchange %s, ALPN %s, peer %s", (NR > 1 ? "; " : ""), $1, $2, $3, $4, $5 }')
        echo "- Negotiated on the mTLS connections (bench-connect's first handshake of each run, the proxy's own" \
            "mesh client config): **${negotiated:-none recorded}**."
        echo "- Keep-alive: closed loop, wrk 1 thread. CPU µs/req: utime+stime of A and B (/proc/PID/stat) over" \
            "the run over the requests completed."
        echo "- New connections: \`bench-connect\` ($CONNECT_WORKERS workers, one thread) opens a connection per" \
            "request straight to B's inbound port: TCP connect, for mTLS the full TLS 1.3 handshake with the" \
            "client certificate from the control plane (no session resumption, as proxies do), one" \
            "\`GET /\` with \`Connection: close\`, the whole response, close. B forwards each request to" \
            "bench-upstream over its pooled keep-alive connection. B CPU µs/conn: B's CPU over the run over" \
            "the connections completed (handshake + one proxied request). Busy: % of one CPU used by B, by" \
            "the generator, and by everything on CPU $SERVER_CPU (/proc/stat); \"other processes\" is CPU" \
            "$SERVER_CPU's busy time minus A, B and bench-upstream: anything else on the machine competing. B's" \
            "CPU per connection is the cost figure; the rate is a maximum only when CPU $SERVER_CPU is near 100%" \
            "busy with A, B and bench-upstream alone and the generator below 100%."
        echo
        echo "| Measure | plaintext | mTLS | mTLS / plaintext |"
        echo "|---|---:|---:|---:|"
        # One row: label, proto, metric, printf format.
        mrow() {
            local p m
            p=$(median "$2" plain "$3")
            m=$(median "$2" mtls "$3")
            echo "| $1 | $(fmt "$p" "$4") | $(fmt "$m" "$4") | $(ratio "$m" "$p") |"
        }
        mrow "Keep-alive: max req/s through A -> B" ka max_rps '%.0f'
        mrow "Keep-alive: CPU µs/req, A + B" ka cpu_us_ab '%.1f'
        mrow "Keep-alive: CPU µs/req, A (client side)" ka cpu_us_a '%.1f'
        mrow "Keep-alive: CPU µs/req, B (server side)" ka cpu_us_b '%.1f'
        mrow "Keep-alive: CPU $SERVER_CPU busy, % (every process on it)" ka busy_server_cpu '%.1f'
        mrow "Keep-alive: CPU $SERVER_CPU busy with other processes, % (should be ~0)" ka busy_other '%.1f'
        mrow "Keep-alive: connections A opened to B (incl. warm-up and check)" ka a_to_b_conns '%.0f'
        mrow "New connections/s to B's inbound" conn conns_per_s '%.0f'
        mrow "New connections: B CPU µs per connection" conn cpu_us_b '%.1f'
        mrow "New connections: B busy, % of a CPU" conn busy_b '%.1f'
        mrow "New connections: generator busy, % of a CPU" conn busy_gen '%.1f'
        mrow "New connections: CPU $SERVER_CPU busy, % (every process on it)" conn busy_server_cpu '%.1f'
        mrow "New connections: CPU $SERVER_CPU busy with other processes, % (should be ~0)" conn busy_other '%.1f'
        local v e
        for v in ka conn; do
            for e in plain mtls; do
                errors_total=$((errors_total + $(total "$v" "$e" errors)))
            done
        done
        echo "| Errors (all rounds) | $(($(total ka plain errors) + $(total conn plain errors))) |" \
            "$(($(total ka mtls errors) + $(total conn mtls errors))) | |"
        echo
        local ka_ratio cpu_plain cpu_mtls conn_ratio hs_plain hs_mtls
        ka_ratio=$(ratio "$(median ka mtls max_rps)" "$(median ka plain max_rps)")
        cpu_plain=$(median ka plain cpu_us_ab)
        cpu_mtls=$(median ka mtls cpu_us_ab)
        conn_ratio=$(ratio "$(median conn mtls conns_per_s)" "$(median conn plain conns_per_s)")
        hs_plain=$(median conn plain cpu_us_b)
        hs_mtls=$(median conn mtls cpu_us_b)
        echo "**Cost of mTLS.** Keep-alive: mTLS keeps ${ka_ratio}x of plaintext throughput; A+B spend" \
            "$(fmt "$cpu_mtls" '%.1f') instead of $(fmt "$cpu_plain" '%.1f') CPU µs per request" \
            "($(diff_us "$cpu_mtls" "$cpu_plain") µs: record encryption and decryption on both sides)." \
            "New connections: ${conn_ratio}x the plaintext rate; the accepting sidecar's CPU per connection" \
            "goes from $(fmt "$hs_plain" '%.1f') to $(fmt "$hs_mtls" '%.1f') µs ($(diff_us "$hs_mtls" "$hs_plain") µs: the" \
            "TLS 1.3 handshake, X25519MLKEM768 key exchange, client-certificate verification)."
        echo
        echo "## Per-round values"
        echo
        echo '```'
        echo "run variant metric round value"
        sort -k1,1 -k2,2 -k3,3 -k4,4n "$RESULTS"
        echo '```'
        echo
        echo "## Commands"
        echo
        echo '```sh'
        echo "cargo build --release -p outrider-proxy -p outrider-control -p outrider-benches --bins"
        awk '!seen[$0]++' "$COMMANDS" | sed "s|$TMP|\$TMP|g"
        echo '```'
        echo
        local f
        for f in client-mtls server-mtls client-plain server-plain; do
            echo "<details><summary>Policy document <code>$f.yaml</code></summary>"
            echo
            echo '```yaml'
            cat "$CONTROL_DIR/policies/$f.yaml"
            echo '```'
            echo "</details>"
            echo
        done
    } >"$TMP/report.md"
    mkdir -p "$(dirname "$OUT")"
    cp "$TMP/report.md" "$OUT"
    cat "$TMP/report.md"
    log "report written to $OUT"
    if ((errors_total)); then
        KEEP_TMP=1
        die "$errors_total errors (report written anyway); see the per-round values and the raw output in $TMP"
    fi
}

# ---- main -------------------------------------------------------------------------------
# Runs $1 (one round of a benchmark) $ROUNDS times with $ROUND set, then $2 (its report).
# The time logged counts from the caller's $started (setup included).
run_rounds() {
    local round=$1 report=$2
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        "$round"
    done
    log "measured in $((SECONDS - started)) s"
    "$report"
}

main() {
    ensure_tools
    log "building release binaries"
    if ((NO_BUILD)); then
        log "--no-build: using target/release as it is"
    elif ((MTLS)); then
        cargo build --release -p outrider-proxy -p outrider-control -p outrider-benches --bins >&2
    else
        cargo build --release -p outrider-proxy -p outrider-benches --bins >&2
    fi
    [[ $(nproc) -ge 2 ]] || die "needs at least 2 CPUs (generator on CPU $LOADGEN_CPU, servers on CPU $SERVER_CPU)"
    check_ports_free

    TMP=$(mktemp -d "${TMPDIR:-/tmp}/outrider-load.XXXXXX")
    RESULTS=$TMP/results.txt
    COMMANDS=$TMP/commands.txt
    : >"$RESULTS"
    : >"$COMMANDS"
    WRK_LUA=$TMP/report.lua
    # Only done() is defined, so wrk keeps its fast path (no per-response Lua).
    cat >"$WRK_LUA" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK requests=%d duration_us=%d status=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout))
end
EOF
    local started=$SECONDS
    if ((CAPTURE)); then
        setup_capture_pods
        run_rounds run_round_capture report_capture
        return
    fi
    if ((MTLS)); then
        NEGOTIATED=$TMP/negotiated.txt
        : >"$NEGOTIATED"
        start_control
        run_rounds run_round_mtls report_mtls
        return
    fi
    write_nginx_conf
    run_rounds run_round report
}

ROUND=0
main
