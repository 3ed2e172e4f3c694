#!/usr/bin/env bash
# Prepares local broker images for the conformance tests on a machine that cannot pull from a registry, then
# prints the environment variables that point the tests at them.
#
#   scripts/test-images.sh               prepare the images, print a short summary
#   scripts/test-images.sh --print-env   prepare the images, print only `export ...` lines on stdout
#                                        (everything else goes to stderr), for:
#                                          eval "$(scripts/test-images.sh --print-env)"
#
# Each step is skipped when its result already exists (package installed, image present with its tag), so a
# second run only inspects. Exit status: 0 ready, 1 a step failed, 2 bad usage, 3 docker is not reachable
# (the caller decides whether that is fatal).
set -euo pipefail

NATS_BIN=/usr/sbin/nats-server

print_env=0
case "${1:-}" in
    "") ;;
    --print-env) print_env=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/test-images.sh: unknown argument '$1' (only --print-env is accepted)" >&2; exit 2 ;;
esac
[ "$#" -le 1 ] || { echo "scripts/test-images.sh: too many arguments" >&2; exit 2; }

# fd 3 is where the export lines go; with --print-env every other line goes to stderr.
exec 3>&1
if [ "$print_env" = 1 ]; then
    exec 1>&2
fi

log() { echo "test-images: $*"; }
die() { echo "test-images: $*" >&2; exit 1; }

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "test-images: docker is not reachable ('docker info' failed); broker images were not prepared" >&2
    exit 3
fi

# The daemon may have no BuildKit/buildx; the classic builder handles FROM scratch without any registry.
export DOCKER_BUILDKIT=0

# Copies exactly the shared libraries `ldd` lists for binary $1 into root filesystem $2, at the same absolute
# paths (symlinks resolved to files), loader included. ldd lines are "name => /path (addr)", "/path (addr)"
# (the loader) or "linux-vdso.so.1 (addr)" (no file).
copy_libraries() {
    local lib
    while read -r lib; do
        [ -n "$lib" ] || continue
        mkdir -p "$2$(dirname "$lib")"
        cp -L "$lib" "$2$lib"
    done < <(ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }')
}

# --- NATS JetStream ---------------------------------------------------------------------------------------

ensure_nats_package() {
    if dpkg-query -W -f='${Status}' nats-server 2>/dev/null | grep -q 'install ok installed' && [ -x "$NATS_BIN" ]; then
        log "nats-server package already installed"
        return
    fi
    [ "$(id -u)" = 0 ] || die "the nats-server package is missing and installing it needs root"
    export DEBIAN_FRONTEND=noninteractive
    log "installing the nats-server package"
    if ! apt-get install -y nats-server; then
        log "install failed; refreshing the package lists once and retrying"
        apt-get update
        apt-get install -y nats-server
    fi
    [ -x "$NATS_BIN" ] || die "$NATS_BIN is missing after installing nats-server"
}

build_nats_image() {
    local version=$1 ctx lib

    ctx=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $ctx now
    trap "rm -rf '$ctx'" EXIT

    mkdir -p "$ctx/rootfs/data" "$ctx/rootfs/tmp"
    chmod 0755 "$ctx/rootfs/data"
    chmod 1777 "$ctx/rootfs/tmp"
    cp -L "$NATS_BIN" "$ctx/rootfs/nats-server"

    copy_libraries "$NATS_BIN" "$ctx/rootfs"

    cat >"$ctx/Dockerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
EXPOSE 4222
ENTRYPOINT ["/nats-server"]
CMD ["-js", "-sd", "/data"]
EOF

    log "building $NATS_IMAGE from $NATS_BIN (v$version)"
    docker build -q \
        --label "org.opencontainers.image.title=nats-server" \
        --label "org.opencontainers.image.version=$version" \
        --label "org.opencontainers.image.source=debian package nats-server ($NATS_BIN)" \
        -t "$NATS_IMAGE" "$ctx" >/dev/null

    rm -rf "$ctx"
    trap - EXIT
}

# The image is tagged with the version of the packaged binary, whatever version the distribution ships.
ensure_nats_package
NATS_VERSION=$("$NATS_BIN" --version | sed -n 's/^nats-server: v//p')
[ -n "$NATS_VERSION" ] || die "cannot read the version of $NATS_BIN"
NATS_IMAGE=eventbus-local/nats:${NATS_VERSION}
if docker image inspect "$NATS_IMAGE" >/dev/null 2>&1; then
    log "$NATS_IMAGE already present"
else
    build_nats_image "$NATS_VERSION"
    log "built $NATS_IMAGE"
fi

# --- Kafka protocol (tansu) -------------------------------------------------------------------------------
# tansu is a Kafka-protocol broker published on crates.io; `dynostore` gives it in-memory storage. Building it
# takes about 13 minutes on two cores, once: the binary stays in cargo's bin directory.

TANSU_VERSION=0.6.0
TANSU_IMAGE=eventbus-local/tansu:${TANSU_VERSION}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin

ensure_tansu_binary() {
    if [ -x "$CARGO_BIN/tansu" ] && "$CARGO_BIN/tansu" --version 2>/dev/null | grep -q " $TANSU_VERSION\$"; then
        log "tansu $TANSU_VERSION already installed"
        return
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo is needed to build tansu"
    log "building tansu $TANSU_VERSION from crates.io (about 13 minutes on two cores)"
    cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked
}

build_tansu_image() {
    local ctx lib
    ctx=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $ctx now
    trap "rm -rf '$ctx'" EXIT
    mkdir -p "$ctx/rootfs/tmp"
    chmod 1777 "$ctx/rootfs/tmp"
    cp -L "$CARGO_BIN/tansu" "$ctx/rootfs/tansu"
    copy_libraries "$CARGO_BIN/tansu" "$ctx/rootfs"
    cat >"$ctx/Dockerfile" <<'EOF2'
FROM scratch
COPY rootfs/ /
EXPOSE 9092
ENTRYPOINT ["/tansu"]
CMD ["broker", "--storage-engine", "memory://tansu/"]
EOF2
    log "building $TANSU_IMAGE from $CARGO_BIN/tansu"
    docker build -q \
        --label "org.opencontainers.image.title=tansu" \
        --label "org.opencontainers.image.version=$TANSU_VERSION" \
        --label "org.opencontainers.image.source=crates.io tansu $TANSU_VERSION (features dynostore)" \
        -t "$TANSU_IMAGE" "$ctx" >/dev/null
    rm -rf "$ctx"
    trap - EXIT
}

if docker image inspect "$TANSU_IMAGE" >/dev/null 2>&1; then
    log "$TANSU_IMAGE already present"
else
    ensure_tansu_binary
    build_tansu_image
    log "built $TANSU_IMAGE"
fi

# --- Output -----------------------------------------------------------------------------------------------

if [ "$print_env" = 1 ]; then
    echo "export EVENTBUS_NATS_IMAGE=$NATS_IMAGE" >&3
    echo "export EVENTBUS_KAFKA_IMAGE=$TANSU_IMAGE" >&3
else
    echo "Broker images ready:"
    echo "  NATS JetStream  $NATS_IMAGE"
    echo "  Kafka protocol  $TANSU_IMAGE"
    echo "Use them with:  eval \"\$(scripts/test-images.sh --print-env)\""
    echo "export EVENTBUS_NATS_IMAGE=$NATS_IMAGE"
    echo "export EVENTBUS_KAFKA_IMAGE=$TANSU_IMAGE"
fi
