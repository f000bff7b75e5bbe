"""The package has no import cycles and imports only downward: a static walk of every module's `eqvae_jax`
imports (top-level and deferred ones alike) finds no cycle, and no module imports one of a higher layer (the
order in LAYERS, also in the README's Layout), so a CLI imports the library and never the other way round."""

import ast
import os
import pkgutil
import subprocess
import sys

import pytest

import eqvae_jax

PACKAGE_DIR = os.path.dirname(eqvae_jax.__file__)


def _modules() -> dict[str, str]:
    out = {"eqvae_jax": os.path.join(PACKAGE_DIR, "__init__.py")}
    for info in pkgutil.walk_packages([PACKAGE_DIR], "eqvae_jax."):
        path = os.path.join(PACKAGE_DIR, *info.name.split(".")[1:])
        out[info.name] = os.path.join(path, "__init__.py") if info.ispkg else path + ".py"
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


# Lowest first; a module may import its own layer and the ones below. Entries name a module and everything under
# it (the longest match wins; the package root names only itself); a package's `__main__` is a CLI whatever its
# package's layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("eqvae_jax", "eqvae_jax.typed_config", "eqvae_jax.storage", "eqvae_jax.memo", "eqvae_jax.cli",
     "eqvae_jax.host_malloc"),
    ("eqvae_jax.parallel", "eqvae_jax.images", "eqvae_jax.viz"),
    ("eqvae_jax.models", "eqvae_jax.data"),
    ("eqvae_jax.losses",),
    ("eqvae_jax.eval",),
    ("eqvae_jax.diffusion", "eqvae_jax.maskgit", "eqvae_jax.convert"),
    ("eqvae_jax.train",),
    ("eqvae_jax.main", "eqvae_jax.eval_vae", "eqvae_jax.eval_samples", "eqvae_jax.evaluate", "eqvae_jax.sample",
     "eqvae_jax.export", "eqvae_jax.notebook", "eqvae_jax.replicate"),
)
CLI_LAYER = len(LAYERS) - 1


def layer_of(module: str) -> int:
    """The layer of `module` (index into LAYERS); a `__main__` module is in the CLI layer."""
    if module.endswith(".__main__"):
        return CLI_LAYER
    best, found = "", None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            under = prefix != "eqvae_jax" and module.startswith(prefix + ".")
            if (module == prefix or under) and len(prefix) > len(best):
                best, found = prefix, i
    if found is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS")
    return found


def test_layer_table_is_sane():
    assert layer_of("eqvae_jax") == 0 and layer_of("eqvae_jax.typed_config") == 0
    assert layer_of("eqvae_jax.data.__main__") == CLI_LAYER and layer_of("eqvae_jax.data.iterator") == 2
    assert layer_of("eqvae_jax.notebook.hub") == CLI_LAYER and layer_of("eqvae_jax.train.eval_vae.job") == 6
    assert layer_of("eqvae_jax.eval_samples") == CLI_LAYER and layer_of("eqvae_jax.eval.features") == 4
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("eqvae_jax.new_module")


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    layer = {name: layer_of(name) for name in modules}  # every module has a layer
    upward = [f"{name} (layer {layer[name]}) imports {dep} (layer {layer[dep]})"
              for name, path in sorted(modules.items()) for dep in sorted(_imports(name, path, modules))
              if layer[dep] > layer[name]]
    assert not upward, "imports run up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 60  # the walk found the package
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_test_module_imports_another():
    """Shared test code lives in helper modules (helpers.py, toys.py, *_parity.py), not in test files."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    offenders = []
    for name in sorted(os.listdir(tests_dir)):
        if name.endswith(".py"):
            with open(os.path.join(tests_dir, name)) as f:
                tree = ast.parse(f.read(), name)
            for node in ast.walk(tree):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{name}: {m}" for m in modules if m.split(".")[0].startswith("test_")]
    assert not offenders, offenders


def test_importing_a_command_line_module_defines_no_flags():
    """absl flags are process-global: a CLI that defined its flags on import would clash with another CLI's
    (both have --workdir) as soon as one process imports both, e.g. a test suite or a notebook."""
    code = ("from absl import flags\n"
            "import eqvae_jax.main, eqvae_jax.export, eqvae_jax.sample, eqvae_jax.eval_vae\n"
            "import eqvae_jax.eval_samples, eqvae_jax.evaluate\n"
            "print(sorted(m for m in flags.FLAGS.flags_by_module_dict() if m.startswith('eqvae_jax')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
