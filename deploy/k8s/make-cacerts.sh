#!/bin/sh
# Makes a mesh root in Istio's plug-in CA layout (the `cacerts` Secret's keys) in DIR:
#   ca-cert.pem (the signing certificate: here the root itself), ca-key.pem (its key, 0600),
#   root-cert.pem (the root), cert-chain.pem (ca-cert up to the root).
# ECDSA P-256, 10 years, as `ca serve --data-dir` makes its own. Create the Secret from it once,
# before `pilot install`; every CA replica then signs with the same root (nothing is generated at
# start, so replicas cannot race to make different roots):
#   deploy/k8s/make-cacerts.sh certs
#   kubectl create namespace weft-system
#   kubectl create secret generic cacerts -n weft-system --from-file=certs/
# To sign with an intermediate of your own PKI instead, put it in the same four files.
set -eu
dir=${1:?usage: make-cacerts.sh DIR [TRUST_DOMAIN]}
domain=${2:-cluster.local}
mkdir -p "$dir"
umask 077
openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca-key.ec.pem"
openssl pkcs8 -topk8 -nocrypt -in "$dir/ca-key.ec.pem" -out "$dir/ca-key.pem"
rm -f "$dir/ca-key.ec.pem"
umask 022
openssl req -x509 -new -key "$dir/ca-key.pem" -sha256 -days 3650 \
  -subj "/O=weft/CN=weft root CA ($domain)" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$dir/ca-cert.pem"
cp "$dir/ca-cert.pem" "$dir/root-cert.pem"
cp "$dir/ca-cert.pem" "$dir/cert-chain.pem"
echo "wrote $dir/{ca-cert,ca-key,root-cert,cert-chain}.pem"
