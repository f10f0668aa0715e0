#!/usr/bin/env bash
# Fills ROOTFS with weft's image content: the ca, pilot and sidecar binaries from BINDIR (stripped),
# iptables for `sidecar init` (run in the init container, the only one that runs as root; the image
# has no shell), every shared library those load, /etc/passwd with the proxy user 1337, and the
# system roots. Used by build.sh (umoci, no daemon) and by the Dockerfile, so both images hold the
# same files.
#
#   deploy/image/rootfs.sh ROOTFS BINDIR
set -euo pipefail
rootfs="${1:?usage: rootfs.sh ROOTFS BINDIR}"
bins_dir="${2:?usage: rootfs.sh ROOTFS BINDIR}"
die() { echo "rootfs.sh: $*" >&2; exit 1; }
for t in strip ldd; do command -v "$t" >/dev/null || die "$t missing (binutils, libc-bin)"; done
for b in ca pilot sidecar; do [ -x "$bins_dir/$b" ] || die "$bins_dir/$b missing"; done
xtables_nft="$(command -v xtables-nft-multi || true)"
xtables_legacy="$(command -v xtables-legacy-multi || true)"
[ -n "$xtables_nft" ] && [ -n "$xtables_legacy" ] || die "iptables (xtables-nft-multi, xtables-legacy-multi) missing"
xtables_modules="$(dirname "$(ldd "$xtables_nft" | awk '/libxtables/ {print $3}')")/xtables"
[ -d "$xtables_modules" ] || die "iptables' extension modules not found at $xtables_modules"

install -d -m 0755 "$rootfs/usr/local/bin" "$rootfs/usr/sbin" "$rootfs/etc" "$rootfs/run" "$rootfs/var/run"
install -d -m 1777 "$rootfs/tmp"
for b in ca pilot sidecar; do
  install -m 0755 "$bins_dir/$b" "$rootfs/usr/local/bin/$b"
  strip --strip-debug "$rootfs/usr/local/bin/$b"
done
install -m 0755 "$xtables_nft" "$rootfs/usr/sbin/xtables-nft-multi"
install -m 0755 "$xtables_legacy" "$rootfs/usr/sbin/xtables-legacy-multi"
# `iptables` is the nft backend, as on current distributions' nodes; the legacy one is there for
# nodes whose kube-proxy still writes legacy rules (iptables-legacy ...).
for tool in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sf xtables-nft-multi "$rootfs/usr/sbin/$tool"
  ln -sf xtables-legacy-multi "$rootfs/usr/sbin/${tool/iptables/iptables-legacy}"
done
mkdir -p "$rootfs$xtables_modules"
cp -a "$xtables_modules/." "$rootfs$xtables_modules/"

# Every shared library any of those ELF files loads (ldd follows the whole graph), and the loader.
elves=("$rootfs"/usr/local/bin/* "$rootfs/usr/sbin/xtables-nft-multi" "$rootfs/usr/sbin/xtables-legacy-multi" "$rootfs$xtables_modules"/*.so)
ldd "${elves[@]}" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $1 !~ /:$/ {print $1}' | sort -u |
  while read -r lib; do
    [ -e "$rootfs$lib" ] && continue
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
# Debian's merged /usr: binaries name /lib64/ld-linux..., iptables finds its modules under
# /usr/lib/.../xtables; ldd reports either form, so /lib and /lib64 become links into /usr.
for d in lib lib64; do
  if [ -d "$rootfs/$d" ] && [ ! -L "$rootfs/$d" ]; then
    mkdir -p "$rootfs/usr/$d"
    cp -a "$rootfs/$d/." "$rootfs/usr/$d/" && rm -rf "${rootfs:?}/$d" && ln -s "usr/$d" "$rootfs/$d"
  fi
done

# Users: root for the init container, 1337 for the sidecar (the uid iptables exempts from capture).
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nweft-proxy:x:1337:1337:weft proxy:/nonexistent:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nweft-proxy:x:1337:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
# System roots, for an OTLP collector behind TLS.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  install -d "$rootfs/etc/ssl/certs"
  install -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
chmod -R u=rwX,go=rX "$rootfs/usr" "$rootfs/etc"

