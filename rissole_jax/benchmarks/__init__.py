"""Benchmarks: scripts that measure, not tests (python -m rissole_jax.benchmarks.NAME)."""
