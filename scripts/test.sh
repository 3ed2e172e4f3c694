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

if [ -z "${EVENTBUS_NATS_IMAGE:-}" ] || [ -z "${EVENTBUS_KAFKA_IMAGE:-}" ]; then
    # Variables already set win over the local images.
    nats_image=${EVENTBUS_NATS_IMAGE:-} kafka_image=${EVENTBUS_KAFKA_IMAGE:-}
    if images=$(scripts/test-images.sh --print-env); then
        eval "$images"
        EVENTBUS_NATS_IMAGE=${nats_image:-$EVENTBUS_NATS_IMAGE}
        EVENTBUS_KAFKA_IMAGE=${kafka_image:-$EVENTBUS_KAFKA_IMAGE}
        export EVENTBUS_NATS_IMAGE EVENTBUS_KAFKA_IMAGE
        echo "scripts/test.sh: broker images: NATS $EVENTBUS_NATS_IMAGE, Kafka $EVENTBUS_KAFKA_IMAGE" >&2
    else
        echo "scripts/test.sh: local broker images could not be prepared (exit $?); the broker suites use the" \
            "official images, or report themselves as not run without Docker" >&2
    fi
fi

exec cargo test --workspace "$@"
