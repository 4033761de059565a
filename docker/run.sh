#!/usr/bin/env bash
# Run the image on this machine (`make docker-run`, `make docker-train`, `make docker-archive`):
#   docker/run.sh serve              serve model_store/ on 127.0.0.1:8080-8082 until Ctrl-C; a store with no
#                                    .mar gets artifacts/model.pt archived first, by `archive` below
#   docker/run.sh train [ARGS...]    train into artifacts/, MNIST in $MNIST_DIR or data/ (ARGS go to training.train)
#   docker/run.sh archive [ARGS...]  artifacts/model.pt → model_store/mnist.mar, signed with the host's key
# Signing (serving/signing.py) with the host's key dir: $MNIST_SERVE_KEY_DIR, else $XDG_CONFIG_HOME/mnist-serve,
# else ~/.config/mnist-serve, the folder `make archive` signs with on the host.
#   archive  mounts the key dir read-write at /app/keys (made here with mode 0700 if missing): the key it
#            creates or uses outlives the container, so a later serve, in a container or not, trusts it.
#   serve    mounts only <key dir>/trusted, read-only, at /app/trusted (MNIST_SERVE_TRUSTED_DIR), and the
#            store read-only: a server never holds the private key, and cannot re-sign what it serves.
# GPUs (docker only): GPUS=auto (default) adds --gpus all when the NVIDIA runtime is registered;
# GPUS=all (or a device list such as "device=0,1") passes --gpus "$GPUS" without asking the runtime,
# GPUS=cdi adds --device nvidia.com/gpu=all for CDI hosts (nvidia-ctk cdi generate, no runtime
# registered: auto would silently run on the CPU there), GPUS=none runs on the CPU. Training with
# GPUs adds --ipc=host: NCCL and the DataLoader need more shared memory than docker's 64 MB /dev/shm.
# The container runs as your uid
# (group 0, see docker/Dockerfile), so what it writes to the mounted folders is yours.
# Env: DOCKER_IMAGE (default mnist-serve:latest), ENGINE=docker|buildah, the host side of the ports as the
# Makefile sets them (INFERENCE_ADDRESS, MANAGEMENT_ADDRESS, METRICS_ADDRESS), the host folders MODEL_STORE
# (default model_store), ARTIFACTS (default artifacts), MNIST_DIR (default data), MODEL_NAME (default mnist),
# and DRY_RUN=1: print each container command instead of running it (host folders are still made).
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"

inference=${INFERENCE_ADDRESS:-127.0.0.1:8080}
management=${MANAGEMENT_ADDRESS:-127.0.0.1:8081}
metrics=${METRICS_ADDRESS:-127.0.0.1:8082}
model_store=$(realpath -m -- "${MODEL_STORE:-model_store}")
artifacts=$(realpath -m -- "${ARTIFACTS:-artifacts}")
data=$(realpath -m -- "${MNIST_DIR:-data}")
key_dir=$(realpath -m -- "${MNIST_SERVE_KEY_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/mnist-serve}")
model_name=${MODEL_NAME:-mnist}
mar=$model_store/$model_name.mar

# The mounts (and environment) of one command, in $mounts.
mounts_for() {
    case $1 in
        serve)
            [[ -d $key_dir/trusted ]] || die "no trusted keys: $key_dir/trusted is missing; sign an archive first" \
                "(make archive, or docker/run.sh archive), or put the signer's public key (.pub) there"
            mounts=(-v "$model_store:/app/model_store:ro"
                    -v "$key_dir/trusted:/app/trusted:ro" --env MNIST_SERVE_TRUSTED_DIR=/app/trusted
                    --env "MODEL_NAME=$model_name") ;;
        train)
            mkdir -p "$artifacts" "$data"
            mounts=(-v "$artifacts:/app/artifacts" -v "$data:/app/data") ;;
        archive)
            if [[ ! -d $key_dir ]]; then
                install -d -m 0700 "$key_dir"
                echo "created the signing key dir $key_dir (mode 0700)"
            fi
            # Whoever reads the folder can read the key: signing.py also refuses a key file readable by others.
            [[ $(stat -c %a "$key_dir") == 700 ]] || die "$key_dir holds the private key but is mode" \
                "$(stat -c %a "$key_dir"): chmod 700 $key_dir"
            mkdir -p "$model_store"
            mounts=(-v "$artifacts:/app/artifacts:ro" -v "$model_store:/app/model_store"
                    -v "$key_dir:/app/keys" --env MNIST_SERVE_KEY_DIR=/app/keys --env "MODEL_NAME=$model_name") ;;
    esac
}

show() { printf '+'; printf ' %q' "$@"; echo; }

engine=$(detect_engine)
ctr=""
trap '[[ -z $ctr ]] || buildah rm "$ctr" >/dev/null' EXIT

# One container of the image, run to its end (serve: until Ctrl-C).
run_container() {
    local command=$1
    shift
    mounts_for "$command"
    if [[ $engine == docker ]]; then
        local args=(--rm --init --user "$(id -u):0" "${mounts[@]}") gpus=${GPUS:-auto}
        if [[ $command != archive ]]; then  # archiving needs no GPU
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
        fi
        if [[ $command == serve ]]; then
            # Inside, TorchServe listens on 0.0.0.0 (the image's default); outside, on these host addresses.
            args+=(--name mnist-serve -p "$inference:8080" -p "$management:8081" -p "$metrics:8082")
            echo "token: docker exec mnist-serve python -m serving.cli token inference"
        fi
        show docker run "${args[@]}" "$DOCKER_IMAGE" "$command" "$@"
        [[ -n ${DRY_RUN:-} ]] || docker run "${args[@]}" "$DOCKER_IMAGE" "$command" "$@"
        return
    fi

    # buildah: no port publishing and no GPUs. On the host's network TorchServe binds the host addresses
    # itself, so it is not reachable from other machines.
    local addresses=(--env "INFERENCE_ADDRESS=$inference" --env "MANAGEMENT_ADDRESS=$management"
                     --env "METRICS_ADDRESS=$metrics") user=(--user "$(id -u):0")
    local run=(buildah run "${BUILDAH_ISOLATION[@]}" "${user[@]}" "${mounts[@]}" "${addresses[@]}")
    if [[ -n ${DRY_RUN:-} ]]; then
        show "${run[@]}" CONTAINER -- entrypoint.sh "$command" "$@"
        return
    fi
    ctr=$(buildah_container "$DOCKER_IMAGE")
    [[ $command == serve ]] && echo "token: buildah run ${BUILDAH_ISOLATION[*]} ${user[*]} $ctr --" \
        "python -m serving.cli token inference"
    # A session of its own, so that Ctrl-C reaches this script, which stops the server cleanly (buildah_stop).
    show "${run[@]}" "$ctr" -- entrypoint.sh "$command" "$@"
    setsid "${run[@]}" "$ctr" -- entrypoint.sh "$command" "$@" &
    local runner=$! stopping="" status=0
    trap 'stopping=1; buildah_stop "$runner"' INT TERM
    wait "$runner" || status=$?
    if [[ -n $stopping ]]; then status=0; wait "$runner" || status=$?; fi
    trap - INT TERM
    buildah rm "$ctr" >/dev/null
    ctr=""
    return "$status"
}

command=${1:-serve}
[[ $# -gt 0 ]] && shift
case $command in
    serve)
        [[ $# -eq 0 ]] || die "serve takes no arguments"
        if [[ ! -f $mar ]]; then
            # Signing needs the private key, which the serving container never gets: a container of its own.
            [[ -f $artifacts/model.pt ]] || die "no $mar and no $artifacts/model.pt to archive:" \
                "docker/run.sh train (or make train), then docker/run.sh archive"
            echo "no $mar: archiving $artifacts/model.pt first"
            run_container archive
        fi
        run_container serve ;;
    train|archive) run_container "$command" "$@" ;;
    *) die "usage: docker/run.sh serve | train [ARGS...] | archive [ARGS...]" ;;
esac
