#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this). Run as root for the
# transparent-mode tests (network namespaces, iptables); elsewhere they skip, saying why,
# except under CI=true, where they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A one-off CI build gains nothing from incremental caches, which take gigabytes of disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# End-to-end tests start the real binaries; build them first.
cargo build --workspace --bins
cargo test --workspace
