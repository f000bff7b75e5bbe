"""MaskGIT training and sampling pieces (valeoai/Maskgit-pytorch v1), as pure jittable functions.

`masking`: the masking schedule and label drop; `loss`: the training objective; `sampling`: iterative
decoding with Gumbel-noised confidences and ramped classifier-free guidance. The network is
`eqvae_jax.models.maskgit`.
"""
