#!/usr/bin/env bash
# The project's test command: prepares what the suites need on this machine, then runs every test.
#
#   scripts/test.sh [extra cargo test arguments]
#
# Broker images: an EVENTBUS_*_IMAGE variable already set is used as it is. Otherwise scripts/test-images.sh
# builds local images from OS packages (for machines without an image registry) and the variables point at
# them; if that is not possible, the suites fall back to the official images. Each preparation step is skipped
# when its result is already there. With EVENTBUS_REQUIRE_BROKERS=1 (set by CI) a broker suite that cannot
# start its broker fails instead of reporting itself as not run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo is not installed; install a Rust toolchain (https://rustup.rs) first" >&2
    exit 1
fi

if [ -z "${EVENTBUS_NATS_IMAGE:-}" ]; then
    if images=$(scripts/test-images.sh --print-env); then
        eval "$images"
        echo "scripts/test.sh: broker images: EVENTBUS_NATS_IMAGE=$EVENTBUS_NATS_IMAGE" >&2
    else
        echo "scripts/test.sh: local broker images could not be prepared (exit $?); the broker suites use the" \
            "official images, or report themselves as not run without Docker" >&2
    fi
fi

exec cargo test --workspace "$@"
