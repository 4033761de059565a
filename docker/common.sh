# Sourced by docker/build.sh, run.sh and test.sh: the repository root, the image name and the engine.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit

DOCKER_IMAGE=${DOCKER_IMAGE:-mnist-serve:latest}
# buildah without a daemon: chroot isolation and the host's network need no OCI runtime, user
# namespaces or CNI plugins, so they work in CI sandboxes and inside other containers.
# shellcheck disable=SC2034  # used by the scripts that source this file
BUILDAH_ISOLATION=(--isolation chroot --network host)

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
