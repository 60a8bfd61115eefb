#!/usr/bin/env bash
# The demo mesh: `sigil demo` runs a control plane, three workloads and their sidecars on
# loopback and narrates an allowed and a denied call, a live policy change, a revocation
# and the metrics. No root needed. Builds what it runs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build -q -p sigil-proxy -p sigil-control -p sigil-e2e --bins
exec ./target/debug/sigil demo "$@"
