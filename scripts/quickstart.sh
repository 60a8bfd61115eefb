#!/usr/bin/env bash
# The loopback quickstart: two workloads with sigil-proxy sidecars, one allowed and one
# refused call, and their metrics. No root needed (explicit mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build -q -p sigil-proxy -p sigil-e2e --bins
exec cargo run -q -p sigil-e2e --bin sigil-quickstart -- "$@"
