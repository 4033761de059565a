# Sourced by docker/build.sh, run.sh and test.sh: the repository root, the image name and the engine.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit

DOCKER_IMAGE=${DOCKER_IMAGE:-mnist-serve:latest}
# buildah without a daemon: chroot isolation and the host's network need no OCI runtime, user
# namespaces or CNI plugins, so they work in CI sandboxes and inside other containers.
# shellcheck disable=SC2034  # used by the scripts that source this file
BUILDAH_ISOLATION=(--isolation chroot --network host)

# The local Debian base (docker/test.sh, docker/kserve.sh): no image registry is reachable here.
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/mnist-serve-docker
BASE=localhost/mnist-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

die() { echo "${0##*/}: $*" >&2; exit 1; }

# docker where a Docker engine answers, else buildah; ENGINE=docker|buildah forces one.
detect_engine() {
    if [[ -n ${ENGINE:-} ]]; then
        echo "$ENGINE"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v buildah >/dev/null; then
        echo buildah
    else
        die "no Docker engine answers and buildah is missing: start Docker, or install buildah (apt-get install buildah)"
    fi
}

# A buildah working container of the image, for `buildah run`. buildah 1.28 lays the image's
# VOLUMEs over -v binds to the same paths when a run has two or more binds: this container drops
# them, since every run binds what it needs there.
buildah_container() {
    local ctr
    ctr=$(buildah from --pull-never "$1")
    buildah config --volume /app/model_store- --volume /app/artifacts- "$ctr"
    echo "$ctr"
}

descendants() { local p; for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done; }

# Stop the command of a `buildah run` (this PID) as `docker stop` would. buildah answers SIGTERM and
# SIGINT with SIGKILL to its command, which would orphan TorchServe (its frontend runs in a session of
# its own): SIGTERM the command itself, the child of buildah's chroot-exec helper (for serve, the
# server: the entrypoint exec'd it). chroot isolation shares the host's process table.
buildah_stop() {
    local pid
    for pid in $(descendants "$1"); do
        [[ $(ps -o args= -p "$pid") == buildah-chroot-exec* ]] && pkill -TERM -P "$pid"
    done
    timeout 40 tail --pid="$1" -f /dev/null || kill -KILL "$1"
}

image_exists() {
    if [[ $ENGINE == docker ]]; then docker image inspect "$1" >/dev/null 2>&1
    else buildah inspect --type image "$1" >/dev/null 2>&1; fi
}

# A debian:bookworm-slim stand-in (no image registry is reachable), as a tarball in $CACHE and an image.
ensure_base() {
    if image_exists "$BASE"; then
        echo "base image $BASE: cached"
        return
    fi
    local tarball=$CACHE/debian-bookworm-minbase.tar root
    root=$(mktemp -d -t mnist-rootfs.XXXXXX)/rootfs
    if [[ ! -s $tarball ]]; then
        debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR"
        rm -f "$root/etc/apt/sources.list"
        cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        # A snapshot mirror serves Release files past their Valid-Until date: take the host's settings.
        apt-config dump | grep -E '^Acquire::Check-(Valid-Until|Date) ' >"$root/etc/apt/apt.conf.d/99mirror" || true
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        mkdir -p "$CACHE"
        tar -C "$root" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
        rm -rf "${root%/rootfs}"
    fi
    local path=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    if [[ $ENGINE == docker ]]; then
        docker import --change "ENV $path" --change 'CMD ["bash"]' "$tarball" "$BASE"
    else
        local c
        c=$(buildah from scratch)
        buildah add "$c" "$tarball" / >/dev/null
        buildah config --env "$path" --cmd bash "$c"
        buildah commit --rm "$c" "$BASE"
    fi
}
