#!/usr/bin/env bash
# weft's whole test suite, exactly as CI runs it (.ci/run calls this). Installs what the tests need,
# then: format check, clippy -D warnings, the one-TLS-provider check, build, and every test.
# Run as root to include the tests that need network namespaces and iptables; as non-root those tests
# print why they skip.
set -euo pipefail
cd "$(dirname "$0")"

./deploy/local/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== ring is the only crypto provider"
if cargo tree --workspace --locked -i aws-lc-rs >/dev/null 2>&1; then
  echo "aws-lc-rs is in the dependency graph; weft builds with ring only (ecosystem.md P1)" >&2
  exit 1
fi

echo "== build"
cargo build --workspace --bins --locked

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
