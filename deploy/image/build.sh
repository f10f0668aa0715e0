#!/usr/bin/env bash
# Builds weft's OCI image without a container daemon and without pulling anything: an empty image
# (umoci, from scratch), the ca, pilot and sidecar binaries (stripped), the shared libraries they
# load, iptables for `sidecar init`, /etc/passwd with the proxy user 1337, and the image config
# (user 1337:1337; no entrypoint: each manifest's `command` chooses the binary, as `pilot inject`
# and `pilot install` write them).
#
#   deploy/image/build.sh [--profile release|debug|NAME] [--out DIR]
#
# Output: DIR/oci (an OCI image layout, tag = the workspace version) and DIR/weft-VERSION.oci.tar
# (the same as an oci-archive). Load it where the cluster can see it, e.g.
#   skopeo copy oci-archive:target/image/weft-0.1.0.oci.tar docker-daemon:weft/weft:0.1.0
#   ctr -n k8s.io images import target/image/weft-0.1.0.oci.tar      (containerd nodes)
# Users with Docker can build the same content from deploy/image/Dockerfile instead.
#
# Needs: umoci, strip (binutils), ldd, iptables installed on this machine (deploy/local/install-deps.sh),
# and the binaries built (cargo build --release --bins). Runs as root or not (rootless unpack).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
profile=release
out="$root/target/image"
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "build.sh: $*" >&2; exit 1; }
command -v umoci >/dev/null || die "umoci missing: run deploy/local/install-deps.sh"

bins_dir="${CARGO_TARGET_DIR:-$root/target}/$profile"
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$root/Cargo.toml")"
[ -n "$version" ] || die "no version in Cargo.toml's [workspace.package]"
[ -x "$bins_dir/sidecar" ] || die "no binaries in $bins_dir: cargo build --release --bins (or --profile NAME)"
rm -rf "$out/oci" "$out/bundle"
mkdir -p "$out"
rootless=()
[ "$(id -u)" = 0 ] || rootless=(--rootless)
umoci init --layout "$out/oci"
umoci new --image "$out/oci:$version"
umoci unpack "${rootless[@]}" --image "$out/oci:$version" "$out/bundle" >/dev/null
rootfs="$out/bundle/rootfs"

"$root/deploy/image/rootfs.sh" "$rootfs" "$bins_dir"

umoci repack --image "$out/oci:$version" "$out/bundle" >/dev/null
umoci config --image "$out/oci:$version" \
  --config.user 1337:1337 \
  --config.env PATH=/usr/local/bin:/usr/sbin:/usr/bin \
  --config.workingdir / \
  --config.cmd sidecar --config.cmd --help \
  --config.label "org.opencontainers.image.title=weft" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.licenses=Apache-2.0" \
  --config.label "org.opencontainers.image.ref.name=weft/weft:$version" \
  --os linux --architecture amd64
umoci gc --layout "$out/oci"
rm -rf "$out/bundle"
(cd "$out/oci" && tar --sort=name -cf "$out/weft-$version.oci.tar" .)
echo "image weft/weft:$version: $out/oci (tag $version), $out/weft-$version.oci.tar ($(du -h "$out/weft-$version.oci.tar" | cut -f1))"
