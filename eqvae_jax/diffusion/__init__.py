"""eqvae_jax.diffusion: DiT / SiT objectives and samplers as jittable functions.

schedule, gaussian, likelihood   DiT's Gaussian diffusion (schedule, forward process, hybrid loss, VB terms)
interpolant                      SiT's linear interpolant with velocity prediction
ddpm_sampling, flow_sampling     DDPM / DDIM and ODE / SDE samplers; guidance: classifier-free guidance
sampling                         class-conditional sampling + VAE decoding, the ADM-evaluator sample file
"""
