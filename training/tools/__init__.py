"""Tools that measure or convert a trained checkpoint: evaluation, exports, wild inputs, OOD data, explanations."""
