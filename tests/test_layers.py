"""The package layers of docs/architecture.md, checked on the source: imports only go down (or stay inside one
package), data_pipelines never reaches train / inference, no cycle between packages, and imports sit at module
level except the few deliberately lazy ones listed here."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = ("unimedvl_jax", "data_pipelines", "configs")

# (rank, package) of each module, from the most specific prefix. Lower ranks may not import higher ones; modules of
# one rank may import each other only inside the same package.
LAYERS = [
    (0, "bottom", ("unimedvl_jax", "unimedvl_jax.packed_batch", "unimedvl_jax.config", "unimedvl_jax.data_config",
                   "unimedvl_jax.curriculum", "unimedvl_jax.tokenizers", "unimedvl_jax.sharding",
                   "unimedvl_jax.distributed", "unimedvl_jax.patches", "unimedvl_jax.image_metrics",
                   "unimedvl_jax.errors", "unimedvl_jax.hlo_stats")),
    (1, "models", ("unimedvl_jax.models",)),
    (2, "interop", ("unimedvl_jax.interop",)),
    (2, "data_pipelines", ("data_pipelines",)),
    (3, "train", ("unimedvl_jax.train",)),
    (3, "inference", ("unimedvl_jax.inference",)),
    (3, "testing", ("unimedvl_jax.testing",)),
    (4, "eval", ("unimedvl_jax.eval",)),
    (4, "aot", ("unimedvl_jax.aot",)),
    (5, "cli", ("unimedvl_jax.cli", "unimedvl_jax.train_cli", "unimedvl_jax.train_vae_cli",
                "unimedvl_jax.inference_cli", "unimedvl_jax.eval_cli", "unimedvl_jax.demo", "unimedvl_jax.entry_point",
                "unimedvl_jax.flags_help", "data_pipelines.build", "unimedvl_jax.compile_cli")),
    (6, "configs", ("configs",)),
]
# Imports that stay inside a function or a try block on purpose: private JAX / grain modules probed in a try block,
# and packages whose import is slow and only some runs need.
LAZY_OK = ("jax._src", "grain._src", "tensorboardX", "torch")


def _modules():
    for top in ("unimedvl_jax", "data_pipelines", "configs"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield ".".join(parts), path


def layer_of(module: str):
    """(rank, package) of a first-party module: the layer with the longest matching prefix (bottom-layer modules
    match exactly, so a new top-level module must be placed in a layer here)."""
    best = None
    for rank, package, prefixes in LAYERS:
        for prefix in prefixes:
            exact_only = package == "bottom"
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank, package)
    assert best is not None, f"{module} is in no layer of tests/test_layers.py"
    return best[1], best[2]


def _imports(module: str, path: pathlib.Path):
    """(imported module, line, at module level?) for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in top_level


def _first_party_target(name: str, known: set[str]):
    """The first-party module an imported name refers to (a module, or the module holding an imported symbol)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _edges():
    modules = dict(_modules())
    known = set(modules)
    for module, path in modules.items():
        for name, line, _ in _imports(module, path):
            if name.split(".")[0] in FIRST_PARTY:
                target = _first_party_target(name, known)
                if target and target != module:
                    yield module, target, f"{path.relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    for module, _ in _modules():
        layer_of(module)


def test_imports_only_go_down_the_layers():
    bad = []
    for src, dst, where in _edges():
        (rs, ps), (rd, pd) = layer_of(src), layer_of(dst)
        if rd > rs or (rd == rs and pd != ps):
            bad.append(f"{where}: {src} ({ps}, layer {rs}) imports {dst} ({pd}, layer {rd})")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(set(bad)))


def test_data_pipelines_never_import_train_or_inference():
    bad = [f"{where}: {dst}" for src, dst, where in _edges()
           if src.startswith("data_pipelines") and dst.startswith(("unimedvl_jax.train", "unimedvl_jax.inference",
                                                                     "unimedvl_jax.eval"))]
    assert not bad, bad


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in _edges():
        a, b = layer_of(src)[1], layer_of(dst)[1]
        if a != b:
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("package import cycle: " + " -> ".join(trail + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_imports_sit_at_module_level():
    inside = []
    for module, path in _modules():
        for name, line, top in _imports(module, path):
            if not top and not name.startswith(LAZY_OK):
                inside.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not inside, "imports inside functions (move them to module level, or justify in LAZY_OK):\n" + \
        "\n".join(sorted(set(inside)))
