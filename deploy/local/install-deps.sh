#!/usr/bin/env bash
# Installs what weft's tests and demo need on a Debian machine, idempotently:
#   apt:  iptables, iproute2, curl, socat (weft-local's relay to a Jaeger; and python3-venv if venvs
#         cannot be made), umoci (deploy/image/build.sh builds the OCI image without a daemon),
#         binutils (its strip), prometheus (test-only: its prometheus and promtool binaries check the
#         add-ons' scrape config and dashboard queries; run directly, never as the systemd service)
#   PyPI: httpbin + gunicorn (+ PyYAML, weft-local's manifest reader) in a venv ($WEFT_VENV; default /opt/weft-venv as root, so that the
#         uid-1337 sidecar and the test apps can read it; ~/.cache/weft/venv otherwise), plus the
#         test-only kubernetes-validate, grpcio, opentelemetry-proto (requirements-test.txt, ~120 MB; WEFT_SKIP_TEST_DEPS=1 skips it,
#         e.g. for the demo alone)
# As non-root it cannot apt-get: it says what is missing and goes on (root-only tests skip then).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ "$(id -u)" = 0 ]; then
  venv="${WEFT_VENV:-/opt/weft-venv}"
else
  venv="${WEFT_VENV:-$HOME/.cache/weft/venv}"
fi

missing=()
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing+=(iptables)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v umoci >/dev/null 2>&1 || missing+=(umoci)
command -v strip >/dev/null 2>&1 || missing+=(binutils)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ! -x "$venv/bin/python" ]; then # only needed to make the venv
  probe="$(mktemp -d)"
  python3 -m venv "$probe/v" >/dev/null 2>&1 || missing+=(python3-venv)
  rm -rf "$probe"
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "install-deps: missing ${missing[*]}; run as root to install them (root-only tests will skip)"
  fi
fi

if [ ! -x "$venv/bin/gunicorn" ] || ! "$venv/bin/python" -c 'import httpbin, yaml' >/dev/null 2>&1; then
  echo "install-deps: creating $venv with httpbin, gunicorn and PyYAML"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  chmod -R a+rX "$venv"
fi
if [ "${WEFT_SKIP_TEST_DEPS:-0}" != 1 ] &&
  ! "$venv/bin/python" -c 'import kubernetes_validate, grpc, opentelemetry.proto.collector.trace.v1' 2>/dev/null; then
  echo "install-deps: adding the test requirements (kubernetes-validate, grpcio, opentelemetry-proto) to $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-test.txt"
  chmod -R a+rX "$venv"
fi
echo "install-deps: ok (venv $venv)"
