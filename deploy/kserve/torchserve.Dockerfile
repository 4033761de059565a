# KServe's TorchServe runtime image (TorchServe 0.12.0 + KServe's wrapper, which bring torch and ts), plus every
# other package the .mar's packed code imports (training/core/, serving/worker/): Pillow, pillow-heif and OpenCV
# to decode and preprocess (training/core/inputs/decode.py imports pillow_heif when the worker loads the
# handler), NumPy, captum for /explanations, ONNX Runtime for the onnx and int8 variants, PyYAML (TorchServe's
# base handler imports it without declaring it: the runtime image has it, named here anyway); and serving/drain.py
# for the readiness probe and the preStop drain. tests/test_kserve.py imports every packed module with only
# these packages. The base is on Docker Hub, which these machines cannot reach: not built here; the predictor
# image (predictor.Dockerfile, `make kserve-image`) is. TorchServe is archived (no security fixes since 2025):
# this is the alternative for clusters that still ship the runtime (docs: Scaling out).
# From the repository root:  docker build -f deploy/kserve/torchserve.Dockerfile -t YOUR-REGISTRY/mnist-kserve:0.12.0 .
# GPU:  --build-arg BASE=docker.io/pytorch/torchserve-kfs:0.12.0-gpu  -t YOUR-REGISTRY/mnist-kserve:0.12.0-gpu
ARG BASE=docker.io/pytorch/torchserve-kfs:0.12.0
FROM ${BASE}
RUN pip install --no-cache-dir "pillow>=10" "pillow-heif>=0.18" "opencv-python-headless>=4.8" "numpy>=1.24" \
    "captum>=0.7" "onnxruntime>=1.17" "pyyaml>=6"
COPY serving/drain.py /home/model-server/drain.py
