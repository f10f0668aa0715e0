# Shared by bench/callgrind-pair.sh and bench/cpu-pair.sh, sourced after they set REL and RECIPE: the
# shared recipe's backend and HAProxy pair (../shared/bench/run.sh), written into a work directory, so
# that weft's pair is measured against the same configuration the recipe uses. Loopback only.
# Sourcing it sets up PIDS: whatever the script starts goes in there and is stopped when it exits.

PIDS=()
stop_started() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop_started EXIT

# Exits unless the tools (after the apt-get hint $1) are on PATH and the release binaries are in $REL.
check_setup() {
  local hint=$1 tool b
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install $hint)" >&2; exit 1; }
  done
  for b in sidecar ca pilot sidecar-pair; do
    [ -x "$REL/$b" ] || { echo "$REL/$b missing: cargo build --release --bins" >&2; exit 1; }
  done
}

# Writes $1/nginx.conf: the recipe's backend on 127.0.0.1:18080, 1 KiB at /1k and 1 MiB at /1m.
write_nginx_conf() {
  local w=$1 body
  body=$(head -c 1024 /dev/zero | tr '\0' 'x')
  [ -s "$w/1m.bin" ] || head -c 1048576 /dev/urandom > "$w/1m.bin"
  cat > "$w/nginx.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $w/nginx.pid;
error_log $w/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:18080 backlog=4096;
    location = /1k { return 200 "$body"; }
    location = /1m { alias $w/1m.bin; }
  }
}
CONF
}

# Writes $1/hap-server.cfg (mTLS in on :16443, out to the backend) and $1/hap-client.cfg (plain HTTP in
# on :16001, mTLS out with ALPN $2: http/1.1 as the recipe's default, or h2), certificates from the
# recipe's certs.sh ($RECIPE) in $1/certs. One thread each, TLS 1.3 AES-128-GCM, `http-reuse always`.
write_haproxy_confs() {
  local w=$1 alpn=$2
  [ -s "$w/certs/client.pem" ] || "$RECIPE/certs.sh" "$w/certs" >/dev/null
  hap_common() { # bind|server
    cat <<CONF
global
  nbthread 1
  ssl-default-$1-ciphersuites TLS_AES_128_GCM_SHA256
  ssl-default-$1-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
CONF
  }
  { hap_common bind; cat <<CONF
frontend inbound
  bind 127.0.0.1:16443 ssl crt $w/certs/server.pem ca-file $w/certs/ca.pem verify required alpn h2,http/1.1
  default_backend app
backend app
  server app 127.0.0.1:18080
CONF
  } > "$w/hap-server.cfg"
  { hap_common server; cat <<CONF
frontend outbound
  bind 127.0.0.1:16001
  default_backend mesh
backend mesh
  server peer 127.0.0.1:16443 ssl crt $w/certs/client.pem ca-file $w/certs/ca.pem verify required verifyhost server.mesh.local sni str(server.mesh.local) alpn $alpn
CONF
  } > "$w/hap-client.cfg"
}

# Waits until $1 answers 200 (at most 20 s).
wait_for() {
  for _ in $(seq 1 100); do
    curl -fs -o /dev/null "$1" && return 0
    sleep 0.2
  done
  echo "$1 does not answer" >&2
  return 1
}
