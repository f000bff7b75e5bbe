"""The Colab notebooks in notebooks/ run end to end, offline, in test mode; committed notebooks carry no outputs.

Each notebook is executed by nbclient in an ipykernel (the venv's python3 kernel) with EQVAE_NOTEBOOK_TEST=1:
every download is replaced by a tiny random-weight model written locally in the real layout (a diffusers
AutoencoderKL per VAE repository, the official DiT state dict), which the notebook's own cells then convert, and
the loops are short. A failing cell fails the test. The kernel sees one CPU device, like a one-chip runtime.

BUDGET_S is nbclient's per-cell timeout (a hang guard, generous for 2 busy CPU cores where a notebook takes ~1-2
min); the notebook's own wall time is printed, never asserted.
"""

import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from cpu_devices import compile_flags
from nbclient import NotebookClient

SUITE_SECONDS = 85  # rough wall time on 2 cores: conftest starts the longest modules first

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BUDGET_S = {"eqvae_quickstart": 180, "finetune_on_tpu": 300, "dit_sampling": 180}
BAD_INPUT_CELLS = {"eqvae_quickstart": 3, "finetune_on_tpu": 2, "dit_sampling": 2}  # `report_errors(stop=False)`s


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(BUDGET_S)


@pytest.mark.parametrize("name", sorted(BUDGET_S))
def test_notebook_is_stripped_and_tidy(name):
    """No outputs or execution counts in git; nbformat 4.5 with cell ids; one python3 kernelspec; Colab TPU."""
    raw = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    assert (raw["nbformat"], raw["nbformat_minor"]) == (4, 5)
    assert raw["metadata"]["kernelspec"] == {"display_name": "Python 3", "language": "python", "name": "python3"}
    assert raw["metadata"]["accelerator"] == "TPU"
    nbformat.validate(nbformat.reads(json.dumps(raw), as_version=4))
    for cell in raw["cells"]:
        assert cell.get("id"), cell
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (name, cell["id"])
        assert not {"executionInfo", "outputId"} & set(cell["metadata"]), (name, cell["id"])  # Colab's run traces
    sources = "".join("".join(c["source"]) for c in raw["cells"])
    assert 'REPO_URL = "https://github.com/OWNER/eqvae-jax"' in sources
    assert f"colab.research.google.com/github/OWNER/eqvae-jax/blob/main/notebooks/{name}.ipynb" in sources


@pytest.mark.parametrize("name", sorted(BUDGET_S))
def test_notebook_runs(name, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EQVAE_NOTEBOOK_TEST", "1")
    monkeypatch.setenv("EQVAE_NOTEBOOK_HUB", str(tmp_path_factory.getbasetemp() / "notebook_hub"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", compile_flags())  # one device, like a one-chip runtime
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=BUDGET_S[name], kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.monotonic()
    try:
        client.execute()
    finally:
        if os.environ.get("EQVAE_NOTEBOOK_OUT"):  # keep the executed notebook to look at
            nbformat.write(notebook, Path(os.environ["EQVAE_NOTEBOOK_OUT"]) / f"{name}.ipynb")
    elapsed = time.monotonic() - start
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} showed no figure"
    # Every bad-input cell printed its one-line message (and no traceback).
    messages = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(messages) == BAD_INPUT_CELLS[name], text
    assert "Traceback" not in text
    print(f"{name}: {elapsed:.0f} s, load average {os.getloadavg()[0]:.1f}")
