"""Where the EQ-VAE micro-step's time goes on CPU: each component in JAX and PyTorch on the same inputs.

    python -m benchmarks.step_breakdown                 # SD-VAE fp32, 256 px, batch 1, plain and eq24, 3 repeats
    python -m benchmarks.step_breakdown --quick         # 128 px, 1 repeat: a few minutes
    python -m benchmarks.step_breakdown --profile DIR   # + the JAX G and D steps' per-op profile (JAX profiler)

Components, each forward ("fwd") and forward+backward ("f+b"), with the same weights in both frameworks (the
PyTorch models' random init copied into ours with the converters' key maps; `max|diff|` of the forward outputs
is printed as a check that both sides compute the same thing): the encoder (f+b: parameter gradients), the
decoder at the full latent and at 24/32 of it (f+b: parameter and latent gradients), LPIPS-VGG16 at the
decoded sizes (train mode, dropout on; f+b: the reconstruction's gradient), the PatchGAN (train-mode BatchNorm;
f+b w.r.t. its input, as the G step, and w.r.t. its parameters, as the D step), the resize + rotation transform
of latent and image (f+b: the latent's gradient), the adaptive weight's two last-layer VJPs (decoder conv_out
weight gradients for two cotangents: ours vmapped through `losses.nnx_vjp`, PyTorch two `autograd.grad`), the
Adam updates (ours: the job's optax Adam, jitted with donation; PyTorch: `optimizer.step()`), our non-finite
guard (the Adam update inside `update_if`'s taken branch, less the same update alone; PyTorch has none). Then
the real G and D steps: the job's jitted steps (`train.eqvae.job.build`) against the PyTorch reference step of
benchmarks/train_step.py.

The share columns count each component as often as the step runs it (the `uses` column, `jax|torch` where
they differ): G step = encoder f+b, transform f+b, decoder f+b, LPIPS f+b, PatchGAN f+b(x), the two last-layer
VJPs, Adam + guard; PyTorch runs LPIPS and the PatchGAN backward twice through one forward (d nll / d recon and
d g_loss / d recon for the adaptive weight, then the total's backward), ours once (`losses.autoencoder.
with_gradient` reuses the first two for the total); D step = encoder, transform and decoder forward, PatchGAN
f+b(params) on real and fake, Adam + guard. `sum of parts` against the
measured step shows how much of a step no component explains (glue, recomputation, lost fusion).

Timing: every call after a first (compile) call and `--warmup` more, framework by framework (`time_blocked`
says why not interleaved); medians of `--repeats`. Load average printed. `--xla-kernel-grad` builds the JAX
models with XLA's own conv kernel gradient (the step before `models.conv_grad`).
Prints tables; never used as a test.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import train_step as ts
from benchmarks.common import first_and_median


@dataclasses.dataclass
class Row:
    """One component: callables per framework and mode (None: not applicable), and the measured medians."""

    name: str
    jax_fwd: Callable[[], Any] | None = None
    torch_fwd: Callable[[], Any] | None = None
    jax_fb: Callable[[], Any] | None = None
    torch_fb: Callable[[], Any] | None = None
    diff: float | None = None  # max |jax - torch| of the forward outputs
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # 'jax_fwd' -> median seconds


def time_blocked(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    """Medians of `repeats` calls of each fn, one fn after the other, each after a first call and `warmup` more.

    Not interleaved call by call: PyTorch's OpenMP workers spin for a while after each op and slow an XLA
    call that follows at once (on 2 cores the JAX G step measured 27.5 s interleaved vs 19.7 s alone); the
    untimed calls of each block absorb that.
    """
    return {name: first_and_median(fn, warmup, repeats)[1] for name, fn in fns.items()}


class Components:
    """The JAX and PyTorch components on shared weights and inputs (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, models: ts.TorchModels, vae_cfg: Any, job: Any):
        import jax
        import torch
        from flax import nnx

        from eqvae_jax.convert import discriminator as disc_convert
        from eqvae_jax.convert import kl_vae_keys
        from eqvae_jax.convert import lpips as lpips_convert
        from eqvae_jax.models import discriminator, kl_vae, lpips
        from eqvae_jax.models.weights import assign_variables

        self.args, self.t, self.job = args, models, job
        self.rng = np.random.default_rng(1)
        sd = {k: v.detach().numpy() for k, v in models.vae.state_dict().items()}
        self.vae = kl_vae.abstract(vae_cfg)
        assign_variables(self.vae, kl_vae_keys.torch_to_flax(sd, vae_cfg, "diffusers"))
        sd = {k: v.detach().numpy() for k, v in models.perceptual.state_dict().items()}
        self.lpips = lpips.abstract()
        assign_variables(self.lpips, lpips_convert.flax_variables(sd)[0])
        sd = {k: v.detach().numpy() for k, v in models.disc.state_dict().items()}
        cfg = {"input_nc": 3, "ndf": 64, "n_layers": 3}
        self.disc = discriminator.abstract(cfg)
        assign_variables(self.disc, disc_convert.flax_variables(sd, cfg)[0])
        self.f = vae_cfg.downsample_factor
        self.latent_channels = vae_cfg.latent_channels
        self.key = jax.random.key(0)
        self.torch, self.jax, self.nnx = torch, jax, nnx

    # -- helpers ------------------------------------------------------------------------------------------------
    def array(self, *shape: int) -> np.ndarray:
        return self.rng.uniform(-1, 1, shape).astype(np.float32)

    def pair(self, nhwc: np.ndarray) -> tuple[Any, Any]:
        """(jax NHWC array, torch NCHW tensor) of the same values."""
        return self.jax.device_put(nhwc), self.torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))

    def blocking(self, fn: Callable[..., Any], *a: Any) -> Callable[[], Any]:
        return lambda: self.jax.block_until_ready(fn(*a))

    @staticmethod
    def max_diff(jax_out: Any, torch_out: Any) -> float:
        j = np.asarray(jax_out)
        t = torch_out.detach().numpy()
        t = t.transpose(0, 2, 3, 1) if t.ndim == 4 and j.shape != t.shape else t
        return float(np.abs(j.reshape(t.shape) - t).max())

    def split(self, module: Any, *paths: str) -> tuple[Any, Any, Any]:
        """(graphdef, Params under any of `paths`, the rest) of a module."""
        nnx = self.nnx
        wanted = nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(p) for p in paths)))
        return nnx.split(module, wanted, ...)

    def torch_fb(self, fn: Callable[[], Any], params: list[Any], ct: Any) -> Callable[[], None]:
        """Forward, then backward of <out, ct> into `params` (grads cleared first, as zero_grad(set_to_none))."""

        def run() -> None:
            for p in params:
                p.grad = None
            out = fn()
            out.backward(ct)

        return run

    # -- components ---------------------------------------------------------------------------------------------
    def encoder(self) -> Row:
        jax, nnx, torch, t = self.jax, self.nnx, self.torch, self.t
        b, s = self.args.batch, self.args.size
        x, x_t = self.pair(self.array(b, s, s, 3))
        ct, ct_t = self.pair(self.array(b, s // self.f, s // self.f, 2 * self.latent_channels))
        graph, params, rest = self.split(self.vae, "encoder", "quant_conv")

        def moments(p, x):
            post = nnx.merge(graph, p, rest).encode(x)
            return jax.numpy.concatenate([post.mean, post.logvar], axis=-1)

        fwd = jax.jit(moments)
        fb = jax.jit(lambda p, x, ct: jax.vjp(lambda q: moments(q, x), p)[1](ct))
        tparams = [*t.vae.encoder.parameters(), *t.vae.quant_conv.parameters()]
        with torch.no_grad():
            diff = self.max_diff(fwd(params, x)[..., :self.latent_channels],
                                 t.encode(x_t)[:, :self.latent_channels])
        return Row(f"encoder {s}px", self.blocking(fwd, params, x), torch.no_grad()(lambda: t.encode(x_t)),
                   self.blocking(fb, params, x, ct), self.torch_fb(lambda: t.encode(x_t), tparams, ct_t), diff)

    def decoder(self, latent: int) -> Row:
        jax, nnx, torch, t = self.jax, self.nnx, self.torch, self.t
        b = self.args.batch
        z_np = self.array(b, latent, latent, self.latent_channels)
        z, z_t = self.pair(z_np)
        ct, ct_t = self.pair(self.array(b, latent * self.f, latent * self.f, 3))
        graph, params, rest = self.split(self.vae, "decoder", "post_quant_conv")

        def decode(p, z):
            return nnx.merge(graph, p, rest).decode(z)

        fwd = jax.jit(decode)
        fb = jax.jit(lambda p, z, ct: jax.vjp(decode, p, z)[1](ct))
        tparams = [*t.vae.decoder.parameters(), *t.vae.post_quant_conv.parameters()]
        zt = z_t.clone().requires_grad_(True)
        with torch.no_grad():
            diff = self.max_diff(fwd(params, z), t.decode(z_t))
        return Row(f"decoder {latent}->{latent * self.f}px", self.blocking(fwd, params, z),
                   torch.no_grad()(lambda: t.decode(z_t)), self.blocking(fb, params, z, ct),
                   self.torch_fb(lambda: t.decode(zt), [*tparams, zt], ct_t), diff)

    def lpips_row(self, size: int) -> Row:
        jax, nnx, torch, t = self.jax, self.nnx, self.torch, self.t
        b = self.args.batch
        x, x_t = self.pair(self.array(b, size, size, 3))
        y, y_t = self.pair(self.array(b, size, size, 3))
        graph, state = nnx.split(self.lpips)

        def dist(state, x, y, key):
            return nnx.merge(graph, state)(x, y, dropout_key=key)

        fwd = jax.jit(dist)
        fb = jax.jit(lambda state, x, y, key: jax.grad(lambda r: jax.numpy.sum(dist(state, x, r, key)))(y))
        yt = y_t.clone().requires_grad_(True)
        t.perceptual.eval()  # the check without dropout; timed in train mode (dropout on), as in the step
        with torch.no_grad():
            diff = self.max_diff(jax.jit(lambda s, x, y: nnx.merge(graph, s)(x, y))(state, x, y),
                                 t.perceptual(x_t, y_t).reshape(-1))
        t.perceptual.train()
        return Row(f"LPIPS {size}px", self.blocking(fwd, state, x, y, self.key),
                   torch.no_grad()(lambda: t.perceptual(x_t, y_t)), self.blocking(fb, state, x, y, self.key),
                   self.torch_fb(lambda: t.perceptual(x_t, yt).sum(), [yt], torch.ones(())), diff)

    def patchgan(self, size: int, wrt: str) -> Row:
        """wrt 'x': gradient w.r.t. the image (the G step); 'params': w.r.t. D's parameters (the D step)."""
        jax, nnx, torch, t = self.jax, self.nnx, self.torch, self.t
        b = self.args.batch
        x, x_t = self.pair(self.array(b, size, size, 3))
        graph, params, stats = nnx.split(self.disc, nnx.Param, nnx.BatchStat)
        ct_shape = jax.eval_shape(lambda p, s, x: nnx.merge(graph, p, s, copy=True)(x), params, stats, x).shape
        ct, ct_t = self.pair(self.array(*ct_shape))

        def logits(p, s, x):
            return nnx.merge(graph, p, s, copy=True)(x)

        fwd = jax.jit(logits)
        argnum = 1 if wrt == "x" else 0
        fb = jax.jit(lambda p, s, x, ct: jax.vjp(lambda p, x: logits(p, s, x), p, x)[1](ct)[argnum])
        t.disc.train()
        xt = x_t.clone().requires_grad_(wrt == "x")
        targets = [xt] if wrt == "x" else list(t.disc.parameters())
        with torch.no_grad():
            diff = self.max_diff(fwd(params, stats, x), t.disc(x_t)) if wrt == "x" else None
        torch_fb = self.torch_fb(lambda: t.disc(xt), targets, ct_t)

        def torch_run() -> None:
            for p in t.disc.parameters():  # the G step needs no D parameter gradients, the D step does
                p.requires_grad_(wrt == "params")
            torch_fb()
            for p in t.disc.parameters():
                p.requires_grad_(True)

        return Row(f"PatchGAN {size}px ({'x' if wrt == 'x' else 'params'})", self.blocking(fwd, params, stats, x),
                   torch.no_grad()(lambda: t.disc(x_t)), self.blocking(fb, params, stats, x, ct), torch_run, diff)

    def transform(self) -> Row:
        """Resize by 24/32 then one quarter turn (traced, as in the step) of the latent and the image."""
        import torch.nn.functional as F

        from eqvae_jax.losses import equivariance

        jax, torch = self.jax, self.torch
        b, s = self.args.batch, self.args.size
        plan, rot = ts.draw("eq24").plan((s, s))
        z, z_t = self.pair(self.array(b, s // self.f, s // self.f, self.latent_channels))
        x, x_t = self.pair(self.array(b, s, s, 3))
        ct, ct_t = self.pair(self.array(b, s // self.f * 3 // 4, s // self.f * 3 // 4, self.latent_channels))

        fwd = jax.jit(lambda z, x, k: equivariance.transform_pair(z, x, plan, k))
        fb = jax.jit(lambda z, x, k, ct: jax.vjp(lambda a: equivariance.transform_pair(a, x, plan, k)[0], z)[1](ct))

        def torch_pair(z, x):
            out = [torch.rot90(F.interpolate(a, scale_factor=0.75, mode="bilinear", align_corners=False), k=1,
                               dims=[-1, -2]) for a in (z, x)]
            return out[0], out[1]

        zt = z_t.clone().requires_grad_(True)
        with torch.no_grad():
            diff = self.max_diff(fwd(z, x, rot)[1], torch_pair(z_t, x_t)[1])
        return Row("resize 24/32 + rot90", self.blocking(fwd, z, x, rot), torch.no_grad()(lambda: torch_pair(z_t, x_t)),
                   self.blocking(fb, z, x, rot, ct), self.torch_fb(lambda: torch_pair(zt, x_t)[0], [zt], ct_t), diff)

    def last_layer_vjps(self, size: int) -> Row:
        """The two conv_out weight gradients of the adaptive weight, from conv_out's input (f+b only)."""
        from eqvae_jax.losses.nnx_vjp import vjp_wrt_variable

        jax, nnx, torch, t = self.jax, self.nnx, self.torch, self.t
        b = self.args.batch
        conv = self.vae.decoder.conv_out
        h, h_t = self.pair(self.array(b, size, size, conv.in_features))
        cts = self.jax.device_put(self.array(2, b, size, size, 3))
        cts_t = [torch.from_numpy(np.ascontiguousarray(c.transpose(0, 3, 1, 2))) for c in np.asarray(cts)]
        graph, state = nnx.split(conv)

        @jax.jit
        def grads(state, h, cts):
            _, vjp = vjp_wrt_variable(nnx.merge(graph, state), ("kernel",), lambda m: m(h))
            return jax.vmap(vjp)(cts)

        w = t.vae.decoder.conv_out.weight

        def torch_grads() -> None:
            out = t.vae.decoder.conv_out(h_t)
            torch.autograd.grad(out, w, cts_t[0], retain_graph=True)
            torch.autograd.grad(out, w, cts_t[1])

        return Row(f"last-layer VJPs x2 {size}px", jax_fb=self.blocking(grads, state, h, cts), torch_fb=torch_grads)

    def _jax_adam(self, which: str, guarded: bool = False) -> Callable[[], None]:
        """One call of the job's Adam update of the VAE ('g') or D ('d') parameters (jitted, donated) with
        gradients given; `guarded` runs it as the job does, inside the non-finite guard (train/guard.py:
        all_finite over the gradients, the update in `update_if`'s taken branch)."""
        import optax

        from eqvae_jax.train.guard import all_finite, update_if

        jax, spec = self.jax, self.job.spec
        tx = spec.tx_g if which == "g" else spec.tx_d
        params = jax.tree.map(jax.numpy.copy, self.job.state.vae if which == "g" else self.job.state.disc)
        grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 1e-3), params)
        box = {"params": params, "opt": tx.init(params)}

        def apply(params, opt, grads):
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        def apply_guarded(params, opt, grads):
            return update_if(all_finite(grads), lambda: apply(params, opt, grads), (params, opt))

        update = jax.jit(apply_guarded if guarded else apply, donate_argnums=(0, 1))

        def run() -> None:
            box["params"], box["opt"] = update(box["params"], box["opt"], grads)
            jax.block_until_ready(box["params"])

        return run

    def adam(self, which: str) -> Row:
        """The optimizer update of the VAE ('g') or D ('d') parameters with gradients given."""
        jax, torch, t = self.jax, self.torch, self.t
        model, opt = (t.vae, t.opt_g) if which == "g" else (t.disc, t.opt_d)
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = torch.full_like(p, 1e-3)
        n = sum(x.size for x in jax.tree.leaves(self.job.state.vae if which == "g" else self.job.state.disc))
        return Row(f"Adam {'VAE' if which == 'g' else 'D'} ({n / 1e6:.1f}M)", jax_fb=self._jax_adam(which),
                   torch_fb=opt.step)

    def guard(self) -> tuple[Row, Row]:
        """The non-finite guard of the G step as the job runs it: (guarded Adam, plain Adam) of the VAE on arrays
        of the same shapes; the guard's cost is their difference."""
        return (Row("non-finite guard (G)", jax_fb=self._jax_adam("g", guarded=True)),
                Row("Adam VAE", jax_fb=self._jax_adam("g")))


def fmt(x: float | None, spec: str = ">8.3f") -> str:
    return f"{'-':>8}" if x is None else format(x, spec)


def ratio(t: float | None, j: float | None) -> str:
    return f"{'-':>6}" if t is None or j is None or j == 0 else f"{t / j:>6.2f}"


Terms = list[tuple[str, float]]


def uses(branch: str, args: argparse.Namespace, f: int) -> dict[str, list[tuple[str, Terms, Terms]]]:
    """Row name -> how often one G + D micro-step runs it, as [(time key, multiplicity)] for JAX and for PyTorch
    (module docstring)."""
    s = args.size
    lat = s // f
    if branch == "eq24":
        lat = lat * 3 // 4
    out_px = lat * f
    once: Terms = [("fb", 1)]
    twice_back: Terms = [("fb", 2), ("fwd", -1)]
    g = [
        (f"encoder {s}px", once, once),
        (f"decoder {lat}->{out_px}px", once, once),
        (f"LPIPS {out_px}px", once, twice_back),
        (f"PatchGAN {out_px}px (x)", once, twice_back),
        (f"last-layer VJPs x2 {out_px}px", once, once),
        ("Adam VAE", once, once),
        ("non-finite guard (G)", once, once),
    ]
    d = [
        (f"encoder {s}px", [("fwd", 1)], [("fwd", 1)]),
        (f"decoder {lat}->{out_px}px", [("fwd", 1)], [("fwd", 1)]),
        (f"PatchGAN {out_px}px (params)", [("fb", 2)], [("fb", 2)]),
        ("Adam D", once, once),
    ]
    if branch == "eq24":
        g.append(("resize 24/32 + rot90", once, once))
        d.append(("resize 24/32 + rot90", [("fwd", 1)], [("fwd", 1)]))
    return {"G": g, "D": d}


def describe(terms: Terms) -> str:
    """`[("fb", 2), ("fwd", -1)]` -> '+2fb-1fwd' (the `uses` column)."""
    return "".join(f"{'+' if k > 0 else '-'}{abs(k):g}{m}" for m, k in terms)


def row_time(row: Row, fw: str, terms: Terms) -> float | None:
    total = 0.0
    for mode, k in terms:
        v = row.times.get(f"{fw}_{mode}")
        if v is None:
            return None
        total += k * v
    return total


def profile_steps(job: Any, images: Any, branch: str, out_dir: str, top: int) -> None:
    """Per-op profile of the job's G and D steps (JAX profiler trace of one call each after warm-up), summed by
    HLO instruction and by op kind; the optimized HLO text is written beside it."""
    import jax
    from jax.profiler import ProfileData

    g, d = ts.jax_micro_steps(job, images, branch, seed=7)
    g(), d()
    size = images.shape[1]
    plan, rot = ts.draw(branch).plan((size, size))
    key = jax.random.key(0)
    os.makedirs(out_dir, exist_ok=True)
    hlo = {
        "G": job.steps.generator.lower(job.state, job.lpips_state, images, rot, key, plan).compile().as_text(),
        "D": job.steps.discriminator.lower(job.state, images, rot, key, None, plan).compile().as_text(),
    }
    for name, text in hlo.items():
        with open(os.path.join(out_dir, f"{branch}_{name}.hlo.txt"), "w") as fh:
            fh.write(text)
    for name, fn in (("G", g), ("D", d)):
        trace_dir = tempfile.mkdtemp(dir=out_dir, prefix=f"trace_{branch}_{name}_")
        with jax.profiler.trace(trace_dir):
            if name == "D":
                g()
            start = time.perf_counter()
            fn()
            wall = time.perf_counter() - start
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        summarize_trace(ProfileData.from_file(path), hlo[name], f"{branch} {name} step", wall, top)


_OP = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^ ]+ ([\w\-]+)\(")
_KIND = re.compile(r"kind=(\w+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_ops(text: str) -> dict[str, str]:
    """HLO instruction name -> a short description (opcode, fusion kind and what the fused computation holds)."""
    comps: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            current = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else line.split()[1].lstrip("%")
        elif current:
            m = _OP.match(line)
            if m:
                comps[current].append(m.group(2))
    out = {}
    for lines in [text.splitlines()]:
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            name, op = m.groups()
            desc = op
            if op == "fusion":
                kind = _KIND.search(line)
                called = _CALLS.search(line)
                inner = collections.Counter(comps.get(called.group(1), [])) if called else collections.Counter()
                heavy = [o for o in ("convolution", "dot", "reduce", "transpose", "reduce-window", "select-and-scatter",
                                     "gather", "scatter") if o in inner]
                desc = f"fusion:{kind.group(1) if kind else '?'}[{','.join(heavy)}]"
            out[name] = desc
    return out


def summarize_trace(pd: Any, hlo_text: str, title: str, wall: float, top: int) -> None:
    """Print the thunk events of the XLA:CPU executor summed by HLO name and by op description."""
    ops = hlo_ops(hlo_text)
    by_name: dict[str, float] = collections.defaultdict(float)
    for plane in pd.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name in ops:
                    by_name[ev.name] += ev.duration_ns / 1e9
    by_kind: dict[str, float] = collections.defaultdict(float)
    for n, sec in by_name.items():
        by_kind[ops[n]] += sec
    total = sum(by_name.values())
    print(f"\n{title}: wall {wall:.2f} s, {total:.2f} s in {len(by_name)} HLO ops (thunk events; parallel ops can "
          f"overlap)")
    print(f"  {'op kind':<48}{'s':>8}{'share':>7}")
    for k, sec in sorted(by_kind.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {k:<48}{sec:>8.3f}{100 * sec / total:>6.1f}%")
    print(f"  {'top instructions':<48}")
    for n, sec in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {n[:30]:<30} {ops[n][:17]:<17}{sec:>8.3f}{100 * sec / total:>6.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ts.add_common_args(parser)
    parser.set_defaults(batch=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    parser.add_argument("--quick", action="store_true", help="--size 128 --repeats 1 --warmup 0")
    parser.add_argument("--profile", default="", help="directory: also profile the JAX G and D steps per op")
    parser.add_argument("--top", type=int, default=25, help="rows of each profile table")
    parser.add_argument("--only-steps", action="store_true", help="time only the whole G and D steps")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats, args.warmup = 128, 1, 0
    ts.setup_threads(parser, args)
    branches = ts.check_args(parser, args)
    import jax
    import torch

    from eqvae_jax.models import kl_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    vae_cfg = kl_vae.PRESETS[args.preset]()
    f = vae_cfg.downsample_factor
    print(f"EQ-VAE step breakdown, {args.preset} fp32, {args.size}px, batch {args.batch}, median of {args.repeats}; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}; {ts.thread_settings()}; "
          f"conv kernel gradient {'XLA' if args.xla_kernel_grad else 'tap matmuls (CPU)'}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    job = ts.jax_job(args)
    models = ts.torch_models(args, vae_cfg)
    images = ts.benchmark_images(args)
    c = Components(args, models, vae_cfg, job)
    lat = args.size // f
    sizes = {"plain": lat, "eq24": lat * 3 // 4}
    builders: list[Callable[[], Any]] = [] if args.only_steps else [c.encoder]
    for b in branches:
        if args.only_steps:
            break
        n = sizes[b]
        builders += [lambda n=n: c.decoder(n), lambda n=n: c.lpips_row(n * f), lambda n=n: c.patchgan(n * f, "x"),
                     lambda n=n: c.patchgan(n * f, "params"), lambda n=n: c.last_layer_vjps(n * f)]
        if b == "eq24":
            builders.append(c.transform)
    if not args.only_steps:
        builders += [lambda: c.adam("g"), lambda: c.adam("d")]
    rows: dict[str, Row] = {}
    for build in builders:
        row = build()
        fns = {k: getattr(row, k) for k in ("jax_fwd", "torch_fwd", "jax_fb", "torch_fb") if getattr(row, k)}
        row.times = time_blocked(fns, args.warmup, args.repeats)
        key = re.sub(r" \([\d.]+M\)$", "", row.name)
        rows[key] = row
        print(f"  measured {row.name} (load {os.getloadavg()[0]:.2f})", flush=True)
    if not args.only_steps:
        guard_row, adam_row = c.guard()
        guard_time = time_blocked({"guarded": guard_row.jax_fb, "plain": adam_row.jax_fb}, args.warmup,
                                  args.repeats)
        guard_row.times = {"jax_fb": max(guard_time["guarded"] - guard_time["plain"], 0.0)}
        rows[guard_row.name] = guard_row
    steps: dict[str, dict[str, float]] = {}
    for b in branches:
        jg, jd = ts.jax_micro_steps(job, images, b)
        tg, td = ts.torch_micro_steps(models, b)
        steps[b] = time_blocked({"jax_G": jg, "torch_G": tg, "jax_D": lambda jg=jg, jd=jd: jd(),
                                     "torch_D": td}, args.warmup, args.repeats)
        print(f"  measured steps {b} (load {os.getloadavg()[0]:.2f})", flush=True)

    print(f"\ncomponents (seconds, median of {args.repeats}; ratio = torch / jax, > 1: JAX faster)")
    print(f"{'component':<30}{'jax fwd':>8}{'torch':>8}{'ratio':>6}{'jax f+b':>9}{'torch':>8}{'ratio':>6}"
          f"{'max|diff|':>10}")
    for row in rows.values():
        tm = row.times
        print(f"{row.name:<30}{fmt(tm.get('jax_fwd'))}{fmt(tm.get('torch_fwd'))}"
              f"{ratio(tm.get('torch_fwd'), tm.get('jax_fwd'))} {fmt(tm.get('jax_fb'))}{fmt(tm.get('torch_fb'))}"
              f"{ratio(tm.get('torch_fb'), tm.get('jax_fb'))}{fmt(row.diff, '>10.1e')}")
    for b in branches:
        st = steps[b]
        plan, _ = ts.draw(b).plan((args.size, args.size))
        print(f"\n{plan}: share of the G + D micro-step (component time x uses; ratio = torch / jax)")
        print(f"{'step':<5}{'component':<30}{'uses':<16}{'jax s':>8}{'torch s':>8}{'ratio':>6}{'jax %':>7}"
              f"{'torch %':>8}")
        total_j, total_t = st["jax_G"] + st["jax_D"], st["torch_G"] + st["torch_D"]
        for step_name, items in uses(b, args, f).items():
            sum_j = sum_t = 0.0
            for name, jax_terms, torch_terms in items:
                row = rows.get(name)
                if row is None:
                    continue
                tj, tt = row_time(row, "jax", jax_terms), row_time(row, "torch", torch_terms)
                sum_j += tj or 0.0
                sum_t += tt or 0.0
                desc = describe(jax_terms)
                if torch_terms != jax_terms:
                    desc += f"|{describe(torch_terms)}"
                print(f"{step_name:<5}{name:<30}{desc:<16}{fmt(tj)}{fmt(tt)}{ratio(tt, tj)}"
                      f"{fmt(None if tj is None else 100 * tj / total_j, '>7.1f')}"
                      f"{fmt(None if tt is None else 100 * tt / total_t, '>8.1f')}")
            mj, mt = st[f"jax_{step_name}"], st[f"torch_{step_name}"]
            print(f"{step_name:<5}{'sum of parts':<30}{'':<16}{sum_j:>8.3f}{sum_t:>8.3f}{ratio(sum_t, sum_j)}"
                  f"{100 * sum_j / total_j:>7.1f}{100 * sum_t / total_t:>8.1f}")
            print(f"{step_name:<5}{'measured step':<30}{'':<16}{mj:>8.3f}{mt:>8.3f}{ratio(mt, mj)}"
                  f"{100 * mj / total_j:>7.1f}{100 * mt / total_t:>8.1f}")
            print(f"{step_name:<5}{'not in any part':<30}{'':<16}{mj - sum_j:>8.3f}{mt - sum_t:>8.3f}{'':>6}"
                  f"{100 * (mj - sum_j) / total_j:>7.1f}{100 * (mt - sum_t) / total_t:>8.1f}")
        print(f"{'G+D':<5}{'micro-step':<30}{'':<16}{total_j:>8.3f}{total_t:>8.3f}{ratio(total_t, total_j)}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.profile:
        for b in branches:
            profile_steps(job, images, b, args.profile, args.top)


if __name__ == "__main__":
    main()
