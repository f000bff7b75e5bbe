"""The reconstruction-evaluation job (`python -m eqvae_jax.eval_vae`, configs/eval_vae.py): config (schema +
checks), shards (the resumable unit and its files), job (the jitted per-image metrics and the run), report
(JSON, TensorBoard, comparison PNG, console table). A job beside the training jobs: it uses the run machinery
(workdir, compilation cache, console) that `eqvae_jax.eval`'s metrics must not depend on."""
