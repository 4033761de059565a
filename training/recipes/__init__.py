"""Recipes built on the one training loop (training/loop.py): hyperparameter search, distillation, ensembles."""
