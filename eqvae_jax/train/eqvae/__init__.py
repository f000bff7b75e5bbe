"""The EQ fine-tuning job of both autoencoder families (trainers 'eqvae': KL, 'eqvqgan': VQGAN): config
(schemas + checks), family (what differs), networks, state, steps, evaluation, export, job; compile_order
(the step programs in order of first use) and precompile (compile-only runs for a TPU target)."""
