#!/usr/bin/env bash
# `make kserve-image`: the KServe predictor image from nothing but this repository and the package registries.
#   1. the Debian base, made here with debootstrap (cached, as docker/test.sh makes it)
#   2. the project's CPU image on it (docker/build.sh --cpu; its layer cache keeps the GB-sized venv)
#   3. deploy/kserve/predictor.Dockerfile FROM that image → localhost/mnist-kserve:cpu
# Env: ENGINE=docker|buildah, DEBIAN_MIRROR. Needs root for buildah's chroot
# isolation and debootstrap (as docker/test.sh does).
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"

ENGINE=$(detect_engine)
SERVE_IMAGE=localhost/mnist-serve:cpu
KSERVE_IMAGE=localhost/mnist-kserve:cpu
ensure_base
ca=()
if [[ $ENGINE == buildah ]]; then  # pip in the build trusts the host's CA bundle (docker/test.sh does the same)
    ca=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
fi
DOCKER_IMAGE=$SERVE_IMAGE BASE_IMAGE=$BASE ENGINE=$ENGINE docker/build.sh "${ca[@]}"
args=(-f deploy/kserve/predictor.Dockerfile --build-arg "IMAGE=$SERVE_IMAGE" -t "$KSERVE_IMAGE")
case $ENGINE in
    docker)  docker build "${args[@]}" . ;;
    buildah) buildah build "${BUILDAH_ISOLATION[@]}" --layers --force-rm --format docker --pull-never "${args[@]}" . ;;
esac
echo "built $KSERVE_IMAGE (FROM $SERVE_IMAGE)"
