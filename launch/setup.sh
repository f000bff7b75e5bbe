#!/usr/bin/env bash
# Create .venv in the repository root and install eqvae-jax's pinned dependencies.
#   bash launch/setup.sh          runtime only (training, conversion of safetensors, the demo)
#   bash launch/setup.sh --dev    + test/conversion extras (torch CPU wheel, diffusers, lpips, taming, pytest, ruff,
#                                 torch-fidelity in .venv/side)
#   bash launch/setup.sh --tpu    + the TPU build of the same JAX (run on every TPU VM worker)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; tpu=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --tpu) tpu=1 ;;
    *) echo "usage: bash launch/setup.sh [--dev] [--tpu]" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "$dev" = 1 ]; then
  python -m pip install -q -r requirements-dev.txt
  python -m pip install -q --no-deps -r requirements-nodeps.txt
  # torch-fidelity's Inception is the parity reference of eqvae_jax.eval.inception. It stays out of the venv:
  # installed, torchmetrics imports it and fails on torchvision. Only tests/test_inception.py loads it from here.
  python -m pip install -q --no-deps --upgrade --target .venv/side/torch_fidelity torch-fidelity==0.4.0
else
  python -m pip install -q -r requirements.txt
fi
if [ "$tpu" = 1 ]; then
  python -m pip install -q "jax[tpu]==0.10.2"
fi
python -c "import jax, flax; print('eqvae-jax environment ready: jax', jax.__version__, 'flax', flax.__version__, jax.devices()[0].platform)"
