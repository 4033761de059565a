#!/usr/bin/env bash
# Build the image (`make docker-build`): docker/build.sh [--cpu] [builder options ...]
#   default  CUDA base (nvidia/cuda, see docker/Dockerfile) → mnist-serve:latest
#   --cpu    BASE_IMAGE=docker.io/library/debian:bookworm-slim → mnist-serve:cpu
# Env: BASE_IMAGE, DOCKER_IMAGE (the tag), ENGINE=docker|buildah. Options after --cpu go to the builder,
# e.g. --build-arg PIP_CERT=/run/host-ca.crt with buildah's -v (docker/test.sh does so).
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"

if [[ ${1:-} == --cpu ]]; then
    shift
    BASE_IMAGE=${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}
    [[ $DOCKER_IMAGE == mnist-serve:latest ]] && DOCKER_IMAGE=mnist-serve:cpu
fi
args=(-f docker/Dockerfile -t "$DOCKER_IMAGE")
[[ -n ${BASE_IMAGE:-} ]] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

engine=$(detect_engine)
case $engine in
    docker)  set -x; docker build "${args[@]}" "$@" . ;;
    # --layers: reuse unchanged steps as docker does; --format docker: OCI images drop HEALTHCHECK;
    # --force-rm: no working container left behind by a failed step.
    buildah) set -x; buildah build "${BUILDAH_ISOLATION[@]}" --layers --force-rm --format docker "${args[@]}" "$@" . ;;
esac
