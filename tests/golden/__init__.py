"""Fidelity tests: the core reproduces the original JAX implementation's own numbers (`tests/golden/data/`)."""
