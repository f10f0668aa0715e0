#!/usr/bin/env bash
# Soak: the seed's mesh in explicit mode on 127.0.0.1 under steady load (500 rps of GET /get through
# sleep's sidecar) for MINUTES (default 30), with 2 s bootstrap tokens rewritten every second, 20 s
# certificates, a config change every minute and the CA and pilot restarted in turn every 3 minutes on
# their own addresses. Prints requests sent and failed, certificate renewals, and RSS and open fds of
# ca, pilot and the three sidecars at the start and the end. The driver is bench/src/soak.rs (bin `soak`).
#
# Usage:
#   bench/soak.sh [MINUTES] [soak flags...]      e.g. bench/soak.sh 30
#   bench/soak.sh --fast [soak flags...]         3-minute sanity run (config every 20 s, CA and pilot restarts every 60 s)
#   flags: --rps N --workers N --token-ttl D --cert-ttl D --config-every D --restart-every D --log-dir DIR
# WEFT_SOAK_PROFILE picks the cargo profile built and run: release (default), bench-fast, or dev.
# Only 127.0.0.1 is used; everything started is stopped on exit (Ctrl-C included).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PROFILE=${WEFT_SOAK_PROFILE:-release}
case $PROFILE in
  dev) OUTDIR=debug ;;
  *) OUTDIR=$PROFILE ;;
esac
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

args=()
if [[ ${1:-} =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
  args+=(--minutes "$1")
  shift
fi

if ! command -v hey >/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "installing hey (apt-get install hey)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey >/dev/null
  else
    echo "hey not found: apt-get install hey" >&2
    exit 1
  fi
fi

(cd "$ROOT" && cargo build --locked --profile "$PROFILE" --bins)

# The driver stops everything it started when it gets SIGINT/SIGTERM; forward ours to it and wait.
"$TARGET/$OUTDIR/soak" "${args[@]}" "$@" &
DRIVER=$!
stop() {
  kill -TERM "$DRIVER" 2>/dev/null || true
  wait "$DRIVER" 2>/dev/null || true
}
trap stop INT TERM EXIT
wait "$DRIVER"
