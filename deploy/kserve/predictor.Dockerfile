# The KServe predictor image (serving/predictor/: KServe's Python SDK, Open Inference Protocol v2 over
# REST and gRPC), FROM the project's own image: the same base, the same locked packages (requirements.lock
# has kserve), the same code. No registry image: `make kserve-image` builds both here (docker/kserve.sh).
#   CPU: IMAGE=localhost/mnist-serve:cpu (default)    GPU: --build-arg IMAGE=mnist-serve:latest (CUDA base)
# The archive comes from the InferenceService's storageUri (mounted at /mnt/models: `make kserve-bundle`),
# the trusted public keys from a Secret mounted read-only at $MNIST_SERVE_TRUSTED_DIR (/app/trusted).
ARG IMAGE=localhost/mnist-serve:cpu
FROM ${IMAGE}
# 8080 REST (v2, /metrics), 8081 gRPC: KServe's ports for a custom predictor.
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=4)"]
ENTRYPOINT ["python", "-m", "serving.predictor", "--host", "0.0.0.0", "--http_port", "8080", "--grpc_port", "8081"]
CMD ["--archive", "/mnt/models/model-store/mnist.mar"]
