"""The EQ-VAE fine-tuning job: config (schema + checks), networks, state, steps, evaluation, export, job."""
