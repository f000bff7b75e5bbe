"""The run machinery every job shares, and one subpackage per job.

loop          the training loop (resume, steps, logging, eval, checkpoints, stop, non-finite policy, finish)
run_dir       a run's workdir services: layout, compilation cache, writer, checkpointer, stop requests
config        config sections every job has (length, batch, mesh, log, checkpoint) and their checks
checkpointing Orbax whole-run checkpoints; preemption: SIGTERM handling; guard: the non-finite policy
console       logging setup and the run's own console output; metrics: TensorBoard + metric buffers
compile_variants  compile-variant bookkeeping of jitted steps; ema: the EMA update
compile_pool  compiles a job's programs ahead on threads; metrics_file: the run's metrics.jsonl
eqvae/ dit/ maskgit/ latents/   the training jobs (trainer = 'eqvae' and 'eqvqgan', 'dit', 'maskgit',
              'extract_latents')
eval_vae/     the reconstruction-evaluation job (`python -m eqvae_jax.eval_vae`)
"""
