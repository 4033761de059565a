"""Training: data, shared preprocessing, the CNN and its trainer."""
