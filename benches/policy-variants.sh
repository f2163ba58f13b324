# benches/policy-variants.sh: the policy fragments the benchmarks switch features on with, one
# place for load.sh and instructions.sh. Sourced; defines variables and functions only.

# Every resilience policy with limits the benchmarks never reach, so each is evaluated on every
# request but none triggers: added to the service, and to the route.
EVERY_POLICY_SERVICE='
    timeouts: { connect: 1s, request: 30s, per_try: 10s, idle: 30s }
    retries: { attempts: 2, on: [connect-failure, reset, gateway-error], body_limit: 64KiB }
    rate_limit: { requests_per_second: 100000000, burst: 100000000 }
    circuit_breaker: { consecutive_failures: 1000, failure_rate: { threshold: 0.9, min_requests: 1000, window: 10s }, max_concurrent_requests: 100000 }
    outlier_detection: { consecutive_failures: 1000 }'
EVERY_POLICY_ROUTE='
    rate_limit: { requests_per_second: 100000000, burst: 100000000 }
    fault: { delay: { duration: 1s, percent: 0 }, abort: { status: 503, percent: 0 } }'

# Tracing at ratio 1.0 exported over OTLP/HTTP to the collector at $1 (host:port).
tracing_fragment() {
    printf "\ntracing: { sampling: parent_based, ratio: 1.0, otlp: { endpoint: 'http://%s', protocol: http } }" "$1"
}

# The JSON access log.
ACCESS_LOG='
access_log: json'

# Prints the benchmark policy: Host `bench` -> bench-upstream at $HOST:$PORT_UPSTREAM over $1
# (http1|http2), with $2: "" (base), "policies", "tracing" (collector at $HOST:$PORT_COLLECTOR)
# or "accesslog".
bench_policy() {
    local service_extra="" route_extra="" top_extra=""
    case ${2:-} in
    policies) service_extra=$EVERY_POLICY_SERVICE route_extra=$EVERY_POLICY_ROUTE ;;
    tracing) top_extra=$(tracing_fragment "$HOST:$PORT_COLLECTOR") ;;
    accesslog) top_extra=$ACCESS_LOG ;;
    esac
    cat <<EOF
services:
  bench:
    endpoints: [$HOST:$PORT_UPSTREAM]
    protocol: $1$service_extra
routes:
  - name: bench
    match: { authority: bench }
    service: bench$route_extra$top_extra
EOF
}
