#!/usr/bin/env bash
# Run the image on this machine (`make docker-run`, `make docker-train`):
#   docker/run.sh serve            serve model_store/ (archiving artifacts/model.pt if the store has no .mar)
#                                  on 127.0.0.1:8080-8082 until Ctrl-C
#   docker/run.sh train [ARGS...]  train into artifacts/, MNIST cached in data/ (ARGS go to training.train)
# GPUs (docker only): GPUS=auto (default) adds --gpus all when the NVIDIA runtime is registered;
# GPUS=all (or a device list such as "device=0,1") passes --gpus "$GPUS" without asking the runtime,
# GPUS=cdi adds --device nvidia.com/gpu=all for CDI hosts (nvidia-ctk cdi generate, no runtime
# registered: auto would silently run on the CPU there), GPUS=none runs on the CPU. Training with
# GPUs adds --ipc=host: NCCL and the DataLoader need more shared memory than docker's 64 MB /dev/shm.
# The container runs as your uid
# (group 0, see docker/Dockerfile), so what it writes to the mounted folders is yours.
# Env: DOCKER_IMAGE (default mnist-serve:latest), ENGINE=docker|buildah, and the host side of the
# ports as the Makefile sets them: INFERENCE_ADDRESS, MANAGEMENT_ADDRESS, METRICS_ADDRESS.
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"

inference=${INFERENCE_ADDRESS:-127.0.0.1:8080}
management=${MANAGEMENT_ADDRESS:-127.0.0.1:8081}
metrics=${METRICS_ADDRESS:-127.0.0.1:8082}

command=${1:-serve}
[[ $# -gt 0 ]] && shift
case $command in
    serve) mkdir -p model_store artifacts
           mounts=(-v "$PWD/model_store:/app/model_store" -v "$PWD/artifacts:/app/artifacts:ro") ;;
    train) mkdir -p artifacts data
           mounts=(-v "$PWD/artifacts:/app/artifacts" -v "$PWD/data:/app/data") ;;
    *)     die "usage: docker/run.sh serve | train [ARGS...]" ;;
esac

engine=$(detect_engine)
if [[ $engine == docker ]]; then
    args=(--rm --init --user "$(id -u):0" "${mounts[@]}")
    gpus=${GPUS:-auto}
    if [[ $gpus == auto ]]; then
        gpus=none
        docker info --format '{{json .Runtimes}}' | grep -q nvidia && gpus=all
    fi
    case $gpus in
        none) ;;
        cdi)  args+=(--device nvidia.com/gpu=all) ;;
        *)    args+=(--gpus "$gpus") ;;
    esac
    [[ $gpus != none && $command == train ]] && args+=(--ipc=host)
    if [[ $command == serve ]]; then
        # Inside, TorchServe listens on 0.0.0.0 (the image's default); outside, on these host addresses.
        args+=(--name mnist-serve -p "$inference:8080" -p "$management:8081" -p "$metrics:8082")
        echo "token: docker exec mnist-serve python -m serving.cli token inference"
    fi
    set -x
    exec docker run "${args[@]}" "$DOCKER_IMAGE" "$command" "$@"
fi

# buildah: no port publishing and no GPUs. On the host's network TorchServe binds the host addresses
# itself, so it is not reachable from other machines.
ctr=$(buildah_container "$DOCKER_IMAGE")
addresses=(--env "INFERENCE_ADDRESS=$inference" --env "MANAGEMENT_ADDRESS=$management" --env "METRICS_ADDRESS=$metrics")
user=(--user "$(id -u):0")
trap 'buildah rm "$ctr" >/dev/null' EXIT
[[ $command == serve ]] && echo "token: buildah run ${BUILDAH_ISOLATION[*]} ${user[*]} $ctr --" \
    "python -m serving.cli token inference"
# A session of its own, so that Ctrl-C reaches this script, which stops the server cleanly (buildah_stop).
(set -x; exec setsid buildah run "${BUILDAH_ISOLATION[@]}" "${user[@]}" "${mounts[@]}" "${addresses[@]}" "$ctr" \
    -- entrypoint.sh "$command" "$@") &
runner=$! stopping=""
trap 'stopping=1; buildah_stop "$runner"' INT TERM
status=0
wait "$runner" || status=$?
if [[ -n $stopping ]]; then status=0; wait "$runner" || status=$?; fi
exit "$status"
