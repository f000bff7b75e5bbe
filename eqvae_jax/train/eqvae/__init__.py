"""The EQ fine-tuning job of both autoencoder families (trainers 'eqvae': KL, 'eqvqgan': VQGAN): config
(schemas + checks), family (what differs), networks, state, steps, evaluation, export, job."""
