"""The KServe predictor: a signed .mar served by the KServe Python SDK (Open Inference Protocol v2, REST and gRPC).

archive.py verifies and unpacks the archive and imports the code packed in it; batcher.py gathers
single-digit requests into batches; model.py is the `kserve.Model`; server.py is KServe's ModelServer bound
to one host with v2-shaped errors; __main__.py is the command line.
"""
