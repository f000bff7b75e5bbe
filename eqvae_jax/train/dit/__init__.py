"""DiT / SiT training on a latent cache: config (schema + checks), state, steps, job."""
