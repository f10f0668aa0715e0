#!/usr/bin/env bash
# Time of `pilot apply` for growing numbers of documents, to show the cost is linear in them.
#
# The input is a realistic mix, a quarter each of: Services without clusterIP (allocated by the
# store), DestinationRules with two subsets, VirtualServices with a match, a split and subsets, and
# workload PeerAuthentications. For each size, a fresh `pilot serve` (empty store) gets a dry run
# and then a real apply of the same file. Printed: the client's wall time, and the CPU time the pilot
# process spent on the request (user + system, from /proc; on a shared machine far steadier than wall
# time). Per-document cost should stay flat as the size grows.
#
# Usage: bench/pilot-apply.sh [PILOT_BINARY] [SIZES...]
#   PILOT_BINARY defaults to $CARGO_TARGET_DIR/release/pilot (or target/release/pilot);
#   SIZES default to 500 1000 2000 4000 8000 20000. LIMIT (seconds, default 300) caps one apply.
#   MIX=services makes every document a Service without clusterIP (the allocator's worst case).
# Everything runs in a temporary directory; every pilot started here is stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PILOT=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release/pilot}
shift || true
SIZES=${*:-500 1000 2000 4000 8000 20000}
LIMIT=${LIMIT:-300}
W=$(mktemp -d /tmp/weft-pilot-apply.XXXXXX)
SERVER=""
stop() {
    if [ -n "$SERVER" ]; then
        kill -TERM "$SERVER" 2>/dev/null || true
        # Older pilots ignored SIGTERM while an apply was parsed (and kept parsing after a client
        # timed out): give it 10 s, then kill it.
        for _ in $(seq 100); do
            kill -0 "$SERVER" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
        SERVER=""
    fi
}
trap 'stop; rm -rf "$W"' EXIT

# generate N FILE: N documents (a multiple of 4) in one YAML stream.
generate() {
    if [ "${MIX:-}" = services ]; then
        awk -v n="$1" 'BEGIN {
            for (i = 0; i < n; i++) {
                if (i > 0) print "---"
                printf "apiVersion: v1\nkind: Service\nmetadata: {name: svc%d}\nspec:\n  selector: {app: svc%d}\n  ports: [{port: 80}]\n", i, i
            }
        }' > "$2"
        return
    fi
    awk -v n="$1" 'BEGIN {
        for (i = 0; i < n / 4; i++) {
            if (i > 0) print "---"
            printf "apiVersion: v1\nkind: Service\nmetadata: {name: svc%d, labels: {app: svc%d}}\nspec:\n  selector: {app: svc%d}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n", i, i, i
            printf "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc%d}\nspec:\n  host: svc%d\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n---\n", i, i
            printf "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: svc%d}\nspec:\n  hosts: [svc%d]\n  http:\n  - match:\n    - uri: {prefix: /v2}\n    route:\n    - destination: {host: svc%d, subset: v2}\n  - route:\n    - destination: {host: svc%d, subset: v1}\n      weight: 90\n    - destination: {host: svc%d, subset: v2}\n      weight: 10\n---\n", i, i, i, i, i
            printf "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa%d}\nspec:\n  selector:\n    matchLabels: {app: svc%d}\n  mtls: {mode: STRICT}\n", i, i
        }
    }' > "$2"
}

HZ=$(getconf CLK_TCK)
# cpu PID: user + system seconds the process has used so far.
cpu() {
    awk -v hz="$HZ" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}

# timed ARGS...: "WALL CPU" seconds of one pilot client command (CPU: the server's), or ">LIMIT -".
timed() {
    local start end c0 c1
    c0=$(cpu "$SERVER")
    start=$(date +%s.%N)
    if ! timeout "$LIMIT" "$PILOT" "$@" --data-dir "$W/data" > /dev/null 2> "$W/client.err"; then
        echo ">$LIMIT -"
        return
    fi
    end=$(date +%s.%N)
    c1=$(cpu "$SERVER")
    printf '%.2f %.2f\n' "$(echo "$end - $start" | bc -l)" "$(echo "$c1 - $c0" | bc -l)"
}

echo "pilot: $PILOT"
printf '%9s %12s %12s %12s %12s %14s\n' documents "dry wall s" "dry cpu s" "apply wall s" \
    "apply cpu s" "cpu ms/doc"
for n in $SIZES; do
    generate "$n" "$W/in.yaml"
    rm -rf "$W/data"
    "$PILOT" serve --data-dir "$W/data" > "$W/serve.out" 2> "$W/serve.err" &
    SERVER=$!
    for _ in $(seq 100); do
        grep -q "^listening on" "$W/serve.out" && break
        sleep 0.1
    done
    read -r dry_wall dry_cpu <<< "$(timed apply --dry-run -f "$W/in.yaml")"
    read -r wall used <<< "$(timed apply -f "$W/in.yaml")"
    per="-"
    [ "$used" = "-" ] || per=$(printf '%.3f' "$(echo "$used * 1000 / $n" | bc -l)")
    printf '%9d %12s %12s %12s %12s %14s\n' "$n" "$dry_wall" "$dry_cpu" "$wall" "$used" "$per"
    stop
done
