"""Benchmarks: scripts that measure the pipeline's speed and its presets' accuracy (not tests)."""
