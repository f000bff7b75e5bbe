"""MaskGIT training on a token cache: config (schema + checks), state, steps, job."""
