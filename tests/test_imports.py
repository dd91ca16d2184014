"""The house's import structure, read from the source (every import statement, those inside
functions too, where a circle hides): no circle among uae's modules, the random-weight builders
above the models and scorers (never the reverse), and no module importing another's private name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "uae").rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported uae module, imported name or "")} from every import statement."""
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                pairs = [(a.name, "") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                pairs = [(f"{base}.{a.name}", "") if f"{base}.{a.name}" in mods else (base, a.name) for a in node.names]
            else:
                continue
            for target, name in pairs:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != m:
                    graph[m].add((target, name))
    return graph


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


def test_models_and_scorers_never_import_the_random_weight_builders():
    for m, deps in _imports(_modules()).items():
        if m.startswith(("uae.models", "uae.scoring", "uae.models.layout")):
            assert not any(t.startswith("uae.random_weights") for t, _ in deps), m


def test_no_module_imports_a_private_name():
    private = [(m, t, n) for m, deps in _imports(_modules()).items() for t, n in deps if n.startswith("_")]
    assert not private, private
