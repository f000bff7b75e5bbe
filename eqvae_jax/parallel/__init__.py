"""eqvae_jax.parallel: where programs run (imports nothing else of the package but the ground floor).

mesh          the ('data', 'fsdp') device mesh, batch shardings, rule-based parameter shardings
distributed   multi-host start; coordination: cross-process make-once and failure sharing
aot           ahead-of-time compiles for a Cloud TPU slice into the persistent compilation cache
"""
