"""eqvae_jax.eval: metrics as library functions; the jobs that run them live in `eqvae_jax.train`.

adm_metrics     FID, sFID, IS, precision/recall as ADM's evaluator computes them (numpy features)
inception       the FID InceptionV3 in NNX; features: its jitted, sharded, cached feature extraction
generation      gFID monitoring of a diffusion model during training
reconstruction  PSNR, SSIM, LPIPS of reconstructions; equivariance: the paper's latent equivariance error
latents         intrinsic dimension (TwoNN) and PCA-to-RGB of latents; compare: autoencoders side by side
"""
