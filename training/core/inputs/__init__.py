"""Bytes → 28×28 uint8 MNIST-style digit, without torch: the same code in training, the server and the edge."""
