"""Serving: the TorchServe handler, the archive builder and the server wrapper."""
