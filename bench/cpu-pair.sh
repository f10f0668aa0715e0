#!/usr/bin/env bash
# CPU time per request of each proxy in weft's sidecar pair and in the shared recipe's HAProxy pair
# (HTTP/1.1 between the proxies, the recipe's default), under the recipe's loads: `rate` (1000 rps of
# 1 KiB GETs from hey, 16 connections), `max` (wrk, 32 connections) and `bulk` (wrk, 1 MiB, 4
# connections). Both pairs run side by side and are measured in turn, ROUNDS times.
#
# CPU is each process's scheduler run time (/proc/PID/task/*/schedstat: exact, not sampled by ticks),
# divided by the requests served; the user/system split comes from /proc/PID/stat ticks. On a shared
# VM this moves less than throughput or latency do, but it still moves: read the per-round figures.
#
# Usage (the release binaries must be built: cargo build --release --bins):
#   bench/cpu-pair.sh [ROUNDS]        # default 3; DUR seconds per load (default 5); about 2 min per round
# Only 127.0.0.1 is used; every process started here is stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
RECIPE=${RECIPE:-$ROOT/../shared/bench}
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
ROUNDS=${1:-3}
DUR=${DUR:-5}
LOADS=${LOADS:-"rate max bulk"}
OUT=${OUT:-/tmp/weft-cpu-pair-$(date +%Y%m%d-%H%M%S)}
W=$OUT/work
mkdir -p "$W" "$OUT/recipe"

# shellcheck source=bench/pair-lib.sh
. "$HERE/pair-lib.sh"
check_setup "haproxy nginx-light hey wrk curl python3" haproxy nginx hey wrk curl python3
write_nginx_conf "$W"
write_haproxy_confs "$W" http/1.1
nginx -c "$W/nginx.conf" -p "$W" & PIDS+=($!)
haproxy -db -f "$W/hap-server.cfg" >"$W/hs.log" 2>&1 & HS=$!
haproxy -db -f "$W/hap-client.cfg" >"$W/hc.log" 2>&1 & HC=$!
PIDS+=("$HS" "$HC")
wait_for http://127.0.0.1:16001/1k

# One load through one pair: "round load target side us_per_req user_ticks sys_ticks requests rps" rows.
measure() { # ROUND LOAD TARGET URL CLIENT_PID SERVER_PID
  local round=$1 load=$2 target=$3 url=$4 client=$5 server=$6 cmd
  case $load in
    rate) cmd="hey -z ${DUR}s -c 16 -q 63 $url/1k" ;;
    max) cmd="wrk -t1 -c32 -d${DUR}s $url/1k" ;;
    bulk) cmd="wrk -t1 -c4 -d${DUR}s $url/1m" ;;
  esac
  run_ns() { cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%.0f\n", s}'; }
  ticks() { awk '{print $14, $15}' /proc/"$1"/stat; }
  local c0 s0 ct0 st0 c1 s1 ct1 st1 out n t0 t1
  c0=$(run_ns "$client"); s0=$(run_ns "$server"); ct0=$(ticks "$client"); st0=$(ticks "$server")
  t0=$(date +%s.%N)
  out=$($cmd)
  t1=$(date +%s.%N)
  c1=$(run_ns "$client"); s1=$(run_ns "$server"); ct1=$(ticks "$client"); st1=$(ticks "$server")
  n=$(echo "$out" | awk '/\[200\]/{print $2} /requests in/{print $1}' | head -1)
  [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "no requests served by $target ($load): $out" >&2; return 1; }
  python3 - "$round" "$load" "$target" "$n" "$t0" "$t1" "$c0" "$c1" "$s0" "$s1" "$ct0" "$ct1" "$st0" "$st1" <<'PY'
import sys
r, load, target, n, t0, t1, c0, c1, s0, s1 = sys.argv[1:11]
ct0, ct1, st0, st1 = (tuple(map(int, a.split())) for a in sys.argv[11:15])
n = int(n); rps = n / (float(t1) - float(t0))
for side, a, b, u0, u1 in (("client", c0, c1, ct0, ct1), ("server", s0, s1, st0, st1)):
    us = (int(b) - int(a)) / 1000 / n
    print(f"{r}\t{load}\t{target}\t{side}\t{us:.1f}\t{u1[0]-u0[0]}\t{u1[1]-u0[1]}\t{n}\t{rps:.0f}")
PY
}

# weft's pair comes from sidecar-pair, which runs "run.sh" of the directory it is given with OURS_URL
# and OURS_PIDS set; the rounds run in there, with the HAProxy pair already up.
cat > "$OUT/recipe/run.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
DUR=$DUR
$(declare -f measure)
set -- \$OURS_PIDS
for round in \$(seq 1 $ROUNDS); do
  for load in $LOADS; do
    hey -n 500 -c 16 "\$OURS_URL/1k" >/dev/null; hey -n 500 -c 16 http://127.0.0.1:16001/1k >/dev/null
    # Alternate which pair goes first, so neither always runs just after the other.
    if [ \$((round % 2)) = 1 ]; then
      measure \$round \$load haproxy http://127.0.0.1:16001 $HC $HS
      measure \$round \$load weft "\$OURS_URL" "\$1" "\$2"
    else
      measure \$round \$load weft "\$OURS_URL" "\$1" "\$2"
      measure \$round \$load haproxy http://127.0.0.1:16001 $HC $HS
    fi
  done
done > $OUT/results.tsv
EOF
chmod +x "$OUT/recipe/run.sh"
WEFT_BIN_DIR=$REL "$REL/sidecar-pair" "$OUT/recipe" 1 >"$OUT/weft.log" 2>&1 \
  || { cat "$OUT/weft.log" >&2; exit 1; }

python3 - "$OUT/results.tsv" <<'PY'
import collections, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
us = collections.defaultdict(list); sysshare = collections.defaultdict(list); rps = collections.defaultdict(list)
pair = collections.defaultdict(dict)
for r, load, target, side, u, ut, st, n, rate in rows:
    us[load, target, side].append(float(u))
    if int(ut) + int(st) > 0:
        sysshare[load, target].append(int(st) / (int(ut) + int(st)))
    rps[load, target].append(float(rate))
    pair[load, r].setdefault(target, 0.0)
    pair[load, r][target] += float(u)
med = lambda xs: statistics.median(xs) if xs else float("nan")
print("| load | HAProxy µs/req client, server | weft µs/req client, server | weft/HAProxy per round (pair) | system share HAProxy / weft | req/s HAProxy / weft |")
print("|---|---|---|---|---|---|")
for load in dict.fromkeys(l for _, l, *_ in rows):
    ratios = [p["weft"] / p["haproxy"] for (l, _), p in sorted(pair.items()) if l == load and len(p) == 2]
    print(f"| {load} | {med(us[load,'haproxy','client']):.1f}, {med(us[load,'haproxy','server']):.1f} "
          f"| {med(us[load,'weft','client']):.1f}, {med(us[load,'weft','server']):.1f} "
          f"| {med(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) "
          f"| {med(sysshare[load,'haproxy']):.0%} / {med(sysshare[load,'weft']):.0%} "
          f"| {med(rps[load,'haproxy']):.0f} / {med(rps[load,'weft']):.0f} |")
PY
echo "raw: $OUT/results.tsv"
