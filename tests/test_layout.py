"""The package's shape, kept true by tests: the import graph has no circle and no import
runs upward between the layers that docs/architecture.md names; pyproject.toml lists every
package; a plain (non-editable) install finds conf/; examples in docstrings match files."""

from __future__ import annotations

import ast
import glob
import re
import subprocess
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "tiedlora"

# docs/architecture.md, "Layers": bottom to top. A module belongs to the layer of the longest
# prefix that names it. A module may import its own layer or any layer below, never above.
LAYERS = [
    ("util", ["tiedlora.files", "tiedlora.errors", "tiedlora.compat", "tiedlora.mcore_version",
              "tiedlora.sharding", "tiedlora.metrics", "tiedlora.lr_bracket", "tiedlora.launch"]),
    ("data", ["tiedlora.data"]),
    ("config", ["tiedlora.config", "tiedlora.cli"]),
    ("parallel", ["tiedlora.dist"]),
    ("model", ["tiedlora.models", "tiedlora.peft", "tiedlora.generate"]),
    ("run pieces", ["tiedlora.convert", "tiedlora.checkpoint", "tiedlora.training", "tiedlora.tasks",
                    "tiedlora.mini_base"]),
    ("assembly", ["tiedlora.build", "tiedlora.evaluate"]),
    ("commands", ["tiedlora.finetune", "tiedlora.params", "tiedlora.merge", "tiedlora.export",
                  "tiedlora.submit", "tiedlora.report", "tiedlora.recipes", "tiedlora.prepare_data",
                  "tiedlora.integrations"]),
]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(pkg: Path = PKG) -> dict:
    """module -> the tiedlora modules it imports (at module level or inside functions)."""
    mods = {_module_name(p, pkg.parent): p for p in pkg.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs or [base]
            else:
                continue
            out.update(t for t in targets if t in mods and t != name)
        graph[name] = out
    return graph


def layer_of(module: str) -> int:
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    return found


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_no_import_runs_upward():
    graph = import_graph()
    faces = {"tiedlora"}  # the package's own __init__: imports nothing of tiedlora
    unplaced = sorted(m for m in graph if m not in faces and layer_of(m) is None)
    assert not unplaced, f"modules in no layer of docs/architecture.md: {unplaced}"
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in sorted(graph.items()) if a not in faces
              for b in sorted(targets) if b not in faces and layer_of(b) > layer_of(a)]
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)
    assert not graph["tiedlora"], "tiedlora/__init__.py must import no submodule"


def test_the_checks_see_a_planted_circle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "tiedlora"
    (pkg / "peft").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "peft" / "__init__.py").write_text("")
    (pkg / "files.py").write_text("def f():\n    from tiedlora.peft import model\n")
    (pkg / "peft" / "model.py").write_text("from tiedlora import files\nfrom ..files import f\n")
    graph = import_graph(pkg)
    assert graph["tiedlora.files"] == {"tiedlora.peft.model"}
    assert graph["tiedlora.peft.model"] == {"tiedlora.files"}
    assert find_cycle(graph) is not None
    assert layer_of("tiedlora.peft.model") > layer_of("tiedlora.files")  # the upward arrow


def test_architecture_doc_names_the_layers_of_this_test():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name, prefixes in LAYERS:
        row = next((ln for ln in doc.splitlines() if ln.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/architecture.md has no layer row '| {name} |'"
        for p in prefixes:
            assert p.replace("tiedlora.", "").replace(".", "/") in row, f"{p} missing from the {name} row"


def test_pyproject_lists_every_package_and_ships_conf():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {_module_name(p.parent) for p in PKG.rglob("__init__.py")}
    conf = {"tiedlora.conf"} | {f"tiedlora.conf.{d.name}" for d in (ROOT / "conf").iterdir() if d.is_dir()}
    assert set(tool["packages"]) == found | conf
    assert tool["package-dir"] == {"tiedlora.conf": "conf"}


def test_plain_install_finds_conf(tmp_path):
    """``pip install .`` (not editable) puts conf/ inside the package; composing works there."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for d in ("tiedlora", "conf"):
        subprocess.run(["cp", "-r", str(ROOT / d), str(src / d)], check=True)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), "."], cwd=src, check=True, capture_output=True)
    code = ("import tiedlora, tiedlora.config as c; print(tiedlora.__file__); print(c.CONF_DIR); "
            "print(c.to_object(c.compose('finetune', ['peft=lora'])).peft.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                         check=True, capture_output=True, text=True).stdout.split()
    assert out[0] == str(site / "tiedlora" / "__init__.py")
    assert out[1] == str(site / "tiedlora" / "conf") and out[2] == "lora"


def test_submit_examples_name_existing_recipes():
    from tiedlora import submit

    globs = re.findall(r"'(recipes/[^']+)'", submit.__doc__)
    launchers = set(re.findall(r"launcher=([a-z]\w*)", submit.__doc__))
    assert globs and all(glob.glob(str(ROOT / g)) for g in globs), globs
    assert launchers <= {p.stem for p in (ROOT / "conf" / "launcher").glob("*.yaml")}, launchers
    for y in (ROOT / "conf" / "launcher").glob("*.yaml"):
        for g in re.findall(r"'(recipes/[^']+)'", y.read_text()):
            assert glob.glob(str(ROOT / g)), f"{y.name}: {g} matches nothing"
