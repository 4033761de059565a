"""What runs inside the TorchServe worker, packed whole into every model archive: the handler, request
parsing, the model variants, the KServe v2 protocol, the worker socket's buffered reads and metrics.
It imports only itself and the served core (training/core); the rest of serving/ are operator tools."""
