"""The house's import structure, read from the source (every import statement, those inside
functions too, where a circle hides): no circle among uae's modules, imports that point down the
layers only (LAYERS), the random-weight builders above the models and scorers (never the reverse),
no module importing another's private name, and the toolkit's own imports at module tops, where a
reader sees a module's layer in its first lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top: a module imports from its own layer (without a circle) or from a lower one.
LAYERS = [
    ("infrastructure", ("uae", "uae.errors", "uae.files", "uae.hashing", "uae.images", "uae.paths", "uae.hub",
                        "uae.runtime", "uae.config", "uae.cli", "uae.stream", "uae.data", "uae.remote")),
    ("models, scoring, unified, random weights", ("uae.models", "uae.scoring", "uae.unified", "uae.random_weights")),
    ("library recipes", ("uae.caption_data",)),
    ("applications", ("uae.apps",)),
    ("training and rl", ("uae.training", "uae.rl")),
    ("methods", ("uae.methods",)),
    ("entry points", ("uae.train",)),
]
# The toolkit's imports inside a function body: only for an optional or heavy extra, each saying why
# with this marker at the end of its line or on a comment line right above it; at most this many.
LAZY_MARK = "# lazy:"
MAX_LAZY = 15


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "uae").rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _targets(node: ast.AST, m: str, p: Path, mods: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported uae module, imported name or "") for one import statement; [] for any other node."""
    if isinstance(node, ast.Import):
        pairs = [(a.name, "") for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        base = node.module or ""
        if node.level:
            base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
        pairs = [(f"{base}.{a.name}", "") if f"{base}.{a.name}" in mods else (base, a.name) for a in node.names]
    else:
        return []
    out = []
    for target, name in pairs:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != m:
            out.append((target, name))
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported uae module, imported name or "")} from every import statement."""
    return {m: {t for node in ast.walk(ast.parse(p.read_text())) for t in _targets(node, m, p, mods)}
            for m, p in mods.items()}


def _layer(m: str) -> int | None:
    if m.endswith(".__main__"):
        return len(LAYERS) - 1
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(m == pre or (pre != "uae" and m.startswith(pre + ".")) for pre in prefixes):
            return i
    return None


def _lazy_imports(mods: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(file, line, source line) of each import of a uae module inside a function body."""
    out = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text())
        lines = p.read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for stmt in ast.walk(fn):
                # a nested function's imports are found again from it: count each statement once
                if stmt is not fn and isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                if _targets(stmt, m, p, mods) or (isinstance(stmt, ast.Import) and any(a.name == "uae" for a in stmt.names)):
                    out.append((str(p.relative_to(ROOT)), stmt.lineno, lines[stmt.lineno - 1].strip()))
    return sorted(set(out))


def test_no_import_circle():
    mods = _modules()
    graph = {m: {t for t, _ in deps} for m, deps in _imports(mods).items()}
    done, path, circles = set(), [], []

    def visit(m):
        if m in path:
            circles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert len(mods) > 40 and not circles, circles


def test_every_module_has_a_layer():
    assert not [m for m in _modules() if _layer(m) is None], "add the module to LAYERS"


def test_imports_point_down_the_layers():
    upward = sorted(f"{m} ({LAYERS[_layer(m)][0]}) -> {t} ({LAYERS[_layer(t)][0]})"
                    for m, deps in _imports(_modules()).items() for t, _ in deps
                    if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_models_and_scorers_never_import_the_random_weight_builders():
    for m, deps in _imports(_modules()).items():
        if m.startswith(("uae.models", "uae.scoring")):
            assert not any(t.startswith("uae.random_weights") for t, _ in deps), m


def test_no_module_imports_a_private_name():
    private = [(m, t, n) for m, deps in _imports(_modules()).items() for t, n in deps if n.startswith("_")]
    assert not private, private


def test_toolkit_imports_stand_at_module_tops():
    mods = _modules()
    lazy = _lazy_imports(mods)
    listing = "\n".join(f"{f}:{n}: {line}" for f, n, line in lazy)
    unexplained = []
    for f, n, line in lazy:
        lines = (ROOT / f).read_text().splitlines()
        above = lines[n - 2].strip() if n > 1 else ""
        if LAZY_MARK not in lines[n - 1] and not (above.startswith("#") and LAZY_MARK in above):
            unexplained.append(f"{f}:{n}: {line}")
    assert not unexplained, (f"uae imports inside a function without a '{LAZY_MARK} <reason>' comment "
                             "(move them to the module top):\n" + "\n".join(unexplained))
    assert len(lazy) <= MAX_LAZY, f"{len(lazy)} uae imports inside functions (at most {MAX_LAZY}):\n{listing}"
