#!/usr/bin/env bash
# Instructions per request of weft's sidecar pair and of the shared recipe's HAProxy pair, counted by
# callgrind in the same run: the same 1 KiB GETs (hey, 16 connections) through each pair to the same
# nginx. Unlike the wall-clock recipe (../shared/bench/run.sh), the counts do not move with whatever
# else the machine is doing, so a change to the request path can be judged from one run. They cover
# user space only (syscalls and the kernel's TCP work are not counted) and each proxy runs under
# valgrind on one thread.
#
# Usage (root not needed; the release binaries must be built, with line tables for annotating):
#   CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --bins
#   bench/callgrind-pair.sh [REQUESTS]          # default 3000; takes about a minute
# Keeps the profiles in $OUT (default /tmp/weft-callgrind-<ts>) for callgrind_annotate.
# Only 127.0.0.1 is used; every process started here is stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
RECIPE=${RECIPE:-$ROOT/../shared/bench}
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
N=${1:-3000}
C=16
OUT=${OUT:-/tmp/weft-callgrind-$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$W" "$OUT/bin" "$OUT/recipe"

# shellcheck source=bench/pair-lib.sh
. "$HERE/pair-lib.sh"
check_setup "valgrind haproxy nginx-light hey" valgrind callgrind_control haproxy nginx hey
write_nginx_conf "$W"
nginx -c "$W/nginx.conf" -p "$W" & PIDS+=($!)

VG_OPTS="--tool=callgrind --instr-atstart=no"
# Counts only the measured requests: instrumentation goes on after a warm-up, off with the dump.
measure() { # URL PID... -> one "pid per_request" line per PID
  local url=$1; shift
  hey -n 200 -c $C "$url/1k" >/dev/null
  for p in "$@"; do callgrind_control -i on "$p" >/dev/null; done
  local ok
  ok=$(hey -n "$N" -c $C "$url/1k" | awk '/\[200\]/{print $2}')
  for p in "$@"; do callgrind_control -d "$p" >/dev/null; done
  for p in "$@"; do
    local f total
    f=$(ls "$OUT"/cg.$p.* 2>/dev/null | head -1)
    total=$(awk '/^totals:/{print $2}' "$f")
    echo "$p $((total / ok))"
  done
}

# --- weft: the bench's own pair (sidecar-pair), with each sidecar started under valgrind.
cat > "$OUT/bin/sidecar" <<EOF
#!/bin/sh
exec valgrind $VG_OPTS --callgrind-out-file=$OUT/cg.%p $REL/sidecar "\$@"
EOF
chmod +x "$OUT/bin/sidecar"
ln -sf "$REL/ca" "$OUT/bin/ca"; ln -sf "$REL/pilot" "$OUT/bin/pilot"
# The OTLP sink the sidecars export to when WEFT_BENCH_TRACE_SAMPLING is set (sidecar-pair).
[ ! -x "$REL/otlp-sink" ] || ln -sf "$REL/otlp-sink" "$OUT/bin/otlp-sink"
# sidecar-pair runs "run.sh" from the recipe directory it is given, with OURS_URL and OURS_PIDS.
cat > "$OUT/recipe/run.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
$(declare -f measure)
N=$N C=$C OUT=$OUT
set -- \$OURS_PIDS
measure "\$OURS_URL" "\$1" "\$2" | sed -n '1s/^/client /p;2s/^/server /p' > $OUT/weft.txt
EOF
chmod +x "$OUT/recipe/run.sh"
WEFT_BIN_DIR=$OUT/bin "$REL/sidecar-pair" "$OUT/recipe" 1 >"$OUT/weft.log" 2>&1 \
  || { cat "$OUT/weft.log" >&2; exit 1; }

# --- HAProxy: the recipe's configuration (h1 between the proxies, and h2 as a second reference).
hap() { # ALPN -> "client N" / "server N" lines
  write_haproxy_confs "$W" "$1"
  valgrind $VG_OPTS --callgrind-out-file="$OUT/cg.%p" haproxy -db -f "$W/hap-server.cfg" >"$W/hs.log" 2>&1 & local s=$!
  valgrind $VG_OPTS --callgrind-out-file="$OUT/cg.%p" haproxy -db -f "$W/hap-client.cfg" >"$W/hc.log" 2>&1 & local c=$!
  PIDS+=("$s" "$c")
  wait_for http://127.0.0.1:16001/1k
  measure http://127.0.0.1:16001 "$c" "$s" | sed -n '1s/^/client /p;2s/^/server /p'
  kill "$s" "$c"; wait "$s" "$c" 2>/dev/null || true
}
hap http/1.1 > "$OUT/haproxy-h1.txt"
hap h2 > "$OUT/haproxy-h2.txt"

row() { awk -v side="$2" '$1==side{print $3}' "$1"; }
printf '| instructions per request | weft | HAProxy (h1 between) | ratio | HAProxy (h2 between) | ratio |\n|---|---|---|---|---|---|\n'
for side in client server; do
  ours=$(row "$OUT/weft.txt" $side); h1=$(row "$OUT/haproxy-h1.txt" $side); h2=$(row "$OUT/haproxy-h2.txt" $side)
  awk -v s=$side -v o="$ours" -v a="$h1" -v b="$h2" 'BEGIN{printf "| %s side | %d | %d | %.2f | %d | %.2f |\n", s, o, a, o/a, b, o/b}'
done
echo "profiles: $OUT (callgrind_annotate $OUT/cg.<pid>.1)"
