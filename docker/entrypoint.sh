#!/bin/sh
# The image's front door: `serve` (default) | train | archive | demo | health, or any other command as is.
#   serve    archive artifacts/model.pt if the store has no $MODEL_NAME.mar (only with a key dir mounted), then
#            run TorchServe in the foreground until SIGTERM/SIGINT (serving/server.py stops it and its workers cleanly)
#   train    python -m training.train ARGS       (artifacts/ and data/ are worth mounting)
#   archive  python -m serving.archive ARGS      (artifacts/model.pt → model_store/$MODEL_NAME.mar, signed)
#   demo     train → archive → serve, reusing a checkpoint or archive that is already there
#   health   exit 0 only when every worker of the model is READY (the HEALTHCHECK)
# Signing needs the key dir $MNIST_SERVE_KEY_DIR (/app/keys) mounted from the host: a key made inside
# the container would die with it, and every archive it signed would be refused after a restart.
# Serving needs only the public keys: $MNIST_SERVE_TRUSTED_DIR (/app/trusted), mounted read-only.
set -eu

MODEL_NAME=${MODEL_NAME:-mnist}
MODEL_VERSION=${MODEL_VERSION:-1.0}
CHECKPOINT=artifacts/model.pt
MAR=model_store/$MODEL_NAME.mar

die() { echo "entrypoint: $*" >&2; exit 1; }

archive() {
    key_dir=${MNIST_SERVE_KEY_DIR:-}
    [ -d "${key_dir:-/nonexistent}" ] || die "no signing key dir at ${key_dir:-\$MNIST_SERVE_KEY_DIR}: mount the" \
        "host's (docker/run.sh archive does: -v ~/.config/mnist-serve:/app/keys); a key made here would die with the container"
    # The first archive creates the key there; later ones read it (mode 0700/0600: only its owner can).
    [ -r "$key_dir/signing-key.pem" ] || [ -w "$key_dir" ] || die "the signing key dir $key_dir is not" \
        "usable by uid $(id -u): run the container as its owner (docker run --user \$(id -u):0; compose: MNIST_UID=\$(id -u))"
    python -m serving.archive --checkpoint "$CHECKPOINT" --model-name "$MODEL_NAME" --version "$MODEL_VERSION" "$@"
}

serve() {
    # A store with a version recorded by promote/rollback (serving/store.py) serves that one as it is.
    if [ ! -f "$MAR" ] && [ ! -f "model_store/$MODEL_NAME.default" ]; then
        [ -f "$CHECKPOINT" ] || die "no $MAR and no $CHECKPOINT to archive: mount a model store" \
            "(-v \$PWD/model_store:/app/model_store:ro) or archive first (docker/run.sh archive)"
        echo "entrypoint: no $MAR: archiving $CHECKPOINT"
        archive
    fi
    # Token auth stays on: every call needs a key from this file.
    echo "entrypoint: TorchServe keys will be in $SERVE_DIR/key_file.json;" \
         "read one with: docker exec <container> python -m serving.cli token inference"
    # exec: python becomes the process that receives the container's SIGTERM.
    exec python -m serving.cli start --model-name "$MODEL_NAME" --auth on --foreground
}

health() {
    exec python - "$MODEL_NAME" <<'EOF'
import sys

from serving.server import ServerError, TorchServe

try:
    workers = TorchServe(model_name=sys.argv[1]).describe()["workers"]
except ServerError as err:
    sys.exit(f"unhealthy: {err}")
states = [w["status"] for w in workers]
sys.exit(0 if states and all(s == "READY" for s in states) else f"unhealthy: workers {states}")
EOF
}

command=${1:-serve}
[ $# -gt 0 ] && shift
case $command in
    serve)   serve ;;
    train)   exec python -m training.train "$@" ;;
    archive) archive "$@" ;;
    demo)
        if [ -f "$CHECKPOINT" ]; then echo "entrypoint: using the existing $CHECKPOINT"
        else python -m training.train "$@"; fi
        if [ -f "$MAR" ]; then echo "entrypoint: using the existing $MAR"
        else archive; fi
        serve ;;
    health)  health ;;
    *)       exec "$command" "$@" ;;
esac
