"""The repository's top-level modules must not shadow an installed package or the standard library.

Python puts the script's folder first on sys.path, so a top-level `kernels.py` here wins over the `kernels` package
that transformers >= 5 imports (and the other way round, depending on which is imported first). That broke the test
suite on a fresh machine once; this test keeps it from coming back.
"""
import importlib.metadata
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def top_level_modules(root):
    """Import names the folder `root` defines when it is on sys.path: *.py files and packages (folders with an
    __init__.py)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
    return names


def shadowed(root):
    """{module name: what it shadows} for every top-level module of `root` whose import name is also an installed
    distribution's import name or a standard-library module."""
    installed = importlib.metadata.packages_distributions()   # import name -> [distribution names]
    out = {}
    for name in sorted(top_level_modules(root)):
        if name in installed:
            out[name] = "installed package " + ", ".join(installed[name])
        elif name in sys.stdlib_module_names:
            out[name] = "the standard library"
    return out


def test_no_top_level_module_shadows_an_installed_package():
    # experiments/ is first on sys.path when one of its scripts runs (python experiments/eval.py), so it counts too
    for root in (ROOT, os.path.join(ROOT, "experiments")):
        assert shadowed(root) == {}, "rename these top-level modules: " + str(shadowed(root))


def test_the_check_sees_a_shadowing_module(tmp_path):
    # a temporary folder with one harmless module and two that shadow something this test run surely has
    (tmp_path / "zipcache_only_here.py").write_text("")
    (tmp_path / "pytest.py").write_text("")                   # an installed distribution (we are running it)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "__init__.py").write_text("")        # a standard-library package
    found = shadowed(str(tmp_path))
    assert set(found) == {"pytest", "json"}
    assert "pytest" in found["pytest"] and found["json"] == "the standard library"
