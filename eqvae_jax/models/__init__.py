"""Flax NNX models (NHWC, typed constructor arguments, no config dicts inside modules)."""
