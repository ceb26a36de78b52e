"""The house rules of the layout, checked on the source: which modules may import what.

* Only ``minibnn/backend.py`` and ``kernels/`` import the accelerator libraries (cupy,
  cupyx, numba, llvmlite); everything else asks the backend.
* ``kernels/`` is a leaf: it never imports minibnn.
* Imports run one way, cli -> models/optim/data/deploy -> nn -> binary/functional ->
  tensor -> backend -> kernels: a lower layer never imports a higher one.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATORS = {"cupy", "cupyx", "numba", "llvmlite"}

# layer of each minibnn module: a module may import only modules of a lower or equal layer
LAYERS = {
    "kernels": -1,  # the kernels/ folder, installed as minibnn.kernels
    "io": 0, "rng": 0, "backend": 0, "stepvalues": 0,
    "tensor": 1,
    "functional": 2, "binary": 3,
    "nn": 4, "losses": 4,
    "optim": 5, "models": 5, "data": 1, "summary": 7, "deploy": 6,
    "registry": 6, "runs": 6, "distributed": 6,
    "train": 7, "graphs": 7, "cli": 8, "__main__": 9, "__init__": 9,
}


# the one deliberate upward import: tensor.py's last line imports functional, which attaches
# the operators (+, @, sum, ...) to Tensor once both classes exist
ALLOWED = {("tensor", "functional")}


def _modules():
    for path in sorted((ROOT / "minibnn").rglob("*.py")):
        yield path
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        yield path


def _imports(path):
    """(top-level package, minibnn submodule or None) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                yield parts[0], parts[1] if parts[0] == "minibnn" and len(parts) > 1 else None
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the package of ``path``
                pkg = rel.parts[0]
                depth = len(rel.parts) - 1 - (node.level - 1)
                base = list(rel.parts[:depth])
                mod = (node.module or "").split(".") if node.module else []
                full = base + [p for p in mod if p]
                if full == [pkg]:  # from . import a, b
                    for alias in node.names:
                        yield pkg, alias.name if pkg == "minibnn" else None
                else:
                    yield pkg, full[1] if pkg == "minibnn" and len(full) > 1 else None
            else:
                parts = (node.module or "").split(".")
                yield parts[0], parts[1] if parts[0] == "minibnn" and len(parts) > 1 else None


def _name(path):
    rel = path.relative_to(ROOT / "minibnn")
    return rel.parts[0].removesuffix(".py")


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_accelerator_libraries_stay_in_backend_and_kernels(path):
    rel = path.relative_to(ROOT)
    used = {top for top, _ in _imports(path)} & ACCELERATORS
    if rel.parts[0] == "kernels" or rel == Path("minibnn/backend.py"):
        return
    assert not used, f"{rel} imports {sorted(used)}: ask minibnn.backend instead"


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_never_import_minibnn(path):
    assert "minibnn" not in {top for top, _ in _imports(path)}


@pytest.mark.parametrize("path", sorted((ROOT / "minibnn").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    me = _name(path)
    assert me in LAYERS, f"{me}: new module, give it a layer in tests/test_structure.py"
    for top, sub in _imports(path):
        if top != "minibnn" or sub is None or sub == me or (me, sub) in ALLOWED:
            continue
        assert sub in LAYERS, f"{path.name} imports unknown module minibnn.{sub}"
        assert LAYERS[sub] <= LAYERS[me], (
            f"minibnn.{me} (layer {LAYERS[me]}) imports minibnn.{sub} (layer {LAYERS[sub]}): "
            "a lower layer must not depend on a higher one")


def test_every_package_is_installed():
    """A sub-package missing from setup.cfg works in an editable install and breaks a
    normal one; list every folder with an __init__.py."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    # package_dir maps an installed name to a folder of the repository
    mapped = dict(line.split("=") for line in cfg["options"]["package_dir"].split("\n") if "=" in line)
    folder_of = {k.strip(): v.strip() for k, v in mapped.items()}
    assert folder_of == {"minibnn.kernels": "kernels"}
    installed_as = {v: k for k, v in folder_of.items()}
    found = set()
    for top in ("minibnn", "kernels"):
        for p in (ROOT / top).rglob("__init__.py"):
            parts = p.parent.relative_to(ROOT).parts
            name = ".".join(parts)
            found.add(installed_as.get(name, name))
    assert found <= listed, f"add {sorted(found - listed)} to [options] packages in setup.cfg"
    assert not any(name == "kernels" or name.startswith("kernels.") for name in listed), (
        "no top-level package named kernels may be installed")
