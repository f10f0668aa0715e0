#!/usr/bin/env bash
# Builds weft's cargo-fuzz targets (fuzz/) and runs each for RUNS executions on a scratch copy of
# its committed corpus, then prints a table: target, executions, exec/s, corpus size, crashes.
#
# Usage:
#   bench/fuzz.sh [RUNS]            # default 10000000 executions per target
# Environment:
#   FUZZ_SECONDS=N     also stop each target after N seconds (libFuzzer -max_total_time); 0 = no cap
#   FUZZ_TARGETS="a b" only these targets (default: every target `cargo fuzz list` shows)
#   FUZZ_KEEP=DIR      keep each target's grown corpus in DIR/<target> (default: thrown away)
#   FUZZ_TARGET_DIR    the fuzz build's target dir (default fuzz/target: its flags differ from the
#                      workspace's, sharing one dir would rebuild both ways)
#
# Toolchain: the repository's stable 1.95 with RUSTC_BOOTSTRAP=1, which cargo fuzz's -Z flags need
# (no nightly exists here). No sanitizer: every weft crate forbids unsafe code, so AddressSanitizer
# would only slow the search; what is looked for is panics (failed invariants, overflow: debug
# assertions are on), hangs (-timeout) and runaway memory (-rss_limit_mb).
#
# Crashes stop their target and are copied to fuzz/artifacts/<target>/ (ignored by git): reproduce
# with `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -O -a TARGET fuzz/artifacts/TARGET/crash-...`, fix
# the library, and add the input to fuzz/corpus/TARGET/ (the crates' corpus tests replay it).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
RUNS=${1:-10000000}
SECONDS_CAP=${FUZZ_SECONDS:-0}
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$ROOT/fuzz/target}
BUILD_FLAGS=(--sanitizer none --release --debug-assertions)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cd "$ROOT/fuzz"
TARGETS=${FUZZ_TARGETS:-$(cargo fuzz list)}
echo "building: $(echo "$TARGETS" | tr '\n' ' ')" >&2
# shellcheck disable=SC2086
for t in $TARGETS; do
    cargo fuzz build "${BUILD_FLAGS[@]}" "$t" >&2
done

SCRATCH=$(mktemp -d /tmp/weft-fuzz.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT

rows=()
failed=0
for t in $TARGETS; do
    corpus=$SCRATCH/$t/corpus
    artifacts=$SCRATCH/$t/artifacts
    mkdir -p "$corpus" "$artifacts"
    cp -r "$ROOT/fuzz/corpus/$t/." "$corpus/"
    log=$SCRATCH/$t/log
    echo "fuzzing $t: $RUNS runs${SECONDS_CAP:+, at most ${SECONDS_CAP}s}" >&2
    # Heads, chunked bodies and packets are small; YAML documents and protobuf pushes need room.
    max_len=4096
    case $t in pilot_yaml | route_table | ca_csr) max_len=16384 ;; esac
    status=0
    cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "$corpus" -- \
        -runs="$RUNS" -max_total_time="$SECONDS_CAP" -max_len="$max_len" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    # libFuzzer's final stats (-print_final_stats); after a crash there are none: the last status line.
    stat() { grep -E "^stat::$1:" "$log" | grep -oE '[0-9]+$' || true; }
    execs=$(stat number_of_executed_units)
    rate=$(stat average_exec_per_sec)
    [ -n "$execs" ] || execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    [ -n "$rate" ] || rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    size=$(find "$corpus" -type f | wc -l)
    crashes=$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    if [ "$crashes" -gt 0 ] || [ "$status" -ne 0 ]; then
        failed=1
        mkdir -p "$ROOT/fuzz/artifacts/$t"
        cp "$artifacts"/* "$ROOT/fuzz/artifacts/$t/" 2>/dev/null || true
        cp "$log" "$ROOT/fuzz/artifacts/$t/log"
        echo "$t: exit $status, $crashes crash(es): fuzz/artifacts/$t/" >&2
        grep -m1 -A3 'panicked at' "$log" >&2 || true
    fi
    if [ -n "${FUZZ_KEEP:-}" ]; then
        mkdir -p "$FUZZ_KEEP/$t"
        cp -r "$corpus/." "$FUZZ_KEEP/$t/"
    fi
    rows+=("| $t | ${execs:-?} | ${rate:-?} | $size | $crashes |")
done

echo
echo "| target | executions | exec/s | corpus | crashes |"
echo "|---|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
exit "$failed"
