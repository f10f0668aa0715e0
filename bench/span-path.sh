#!/usr/bin/env bash
# The request path's cost of one sampled span, weft's queue against the OpenTelemetry SDK's batch
# processor (issue 19's rule), counted by callgrind: instructions inside `weft_span` / `sdk_span`
# only (`--toggle-collect`: building the span, its attributes and handing it over; the consumer
# threads are not counted), then the whole process per span for context.
#
# Usage: bench/span-path.sh [SPANS]   (default 4000: below both queues, so no span can be dropped; builds the optimised binary first)
# The optimised build is the bench-fast profile at opt-level 3 throughout (no LTO): both ways are
# built alike, so the ratio holds; absolute counts are a little above a release build's.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
N=${1:-4000}
export CARGO_PROFILE_BENCH_FAST_OPT_LEVEL=3 CARGO_PROFILE_BENCH_FAST_DEBUG=line-tables-only
(cd "$ROOT" && cargo build -q --profile bench-fast -p weft-bench-span-path)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/bench-fast/span-path
OUT=${OUT:-$(mktemp -d /tmp/weft-span-path.XXXXXX)}
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 1; }

per_span() { # MODE FUNCTION TOGGLE(yes|no) -> instructions per span
  local mode=$1 fn=$2 toggle=$3 f="$OUT/cg.$1.$3"
  local opts=(--tool=callgrind --callgrind-out-file="$f")
  [ "$toggle" = yes ] && opts+=(--toggle-collect="*$fn*")
  valgrind "${opts[@]}" "$BIN" "$mode" "$N" >"$OUT/$mode.$toggle.log" 2>&1
  local total
  total=$(awk '/^(summary|totals):/{print $2; exit}' "$f")
  echo $((total / N))
}

echo "callgrind, $N spans each (profiles in $OUT)"
for mode in weft sdk; do
  fn=${mode}_span
  echo "$mode: request path $(per_span "$mode" "$fn" yes) instructions/span; whole process $(per_span "$mode" "$fn" no) instructions/span"
done
"$BIN" cpu
