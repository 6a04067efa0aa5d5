"""The README's tour ("How to read this code: the path of one token") stays true to the code.

Every hop is `file:function` (or `file:Class.method`) and must exist; every other backticked name in the section must
be defined somewhere in the flat core (a function, class, method, attribute, field or module-level name) or be a
flag of generate.py. The hops go file by file (no file is left and revisited) and, within a file, top to bottom, so
a reader reads each file once, downwards; the tour has at most 20 hops.
"""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = [f for f in os.listdir(ROOT) if f.endswith(".py")]


def tour():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("## How to read this code")
    return text[start:text.index("\n## ", start + 1)]


def definitions(path):
    """{qualified name: line} of a file's functions, classes and methods, plus every other name it defines (module and
    class assignments, dataclass fields, self.attributes) as {name: 0}."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                out[prefix + child.name] = child.lineno
                visit(child, prefix + child.name + "." if isinstance(child, ast.ClassDef) else prefix)
            elif isinstance(child, (ast.Assign, ast.AnnAssign)):
                for t in child.targets if isinstance(child, ast.Assign) else [child.target]:
                    if isinstance(t, ast.Name):
                        out.setdefault(t.id, 0)
            visit(child, prefix) if not isinstance(child, (ast.FunctionDef, ast.ClassDef)) else None
    visit(tree, "")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.setdefault(node.attr, 0)
    return out


DEFS = {f: definitions(os.path.join(ROOT, f)) for f in CORE}
ALL_NAMES = {n.split(".")[-1] for d in DEFS.values() for n in d} | {f[:-3] for f in CORE}


def check_hops(text):
    hops = re.findall(r"^\d+\. `([\w.]+\.py):([\w.]+)`", text, flags=re.M)
    assert 10 <= len(hops) <= 20, f"{len(hops)} hops; the tour should be at most 20"
    seen_files, last = [], {}
    for f, name in hops:
        assert f in DEFS, f"tour hop {f}:{name}: no such file"
        assert name in DEFS[f] and DEFS[f][name], f"tour hop {f}:{name}: no such function in {f}"
        if not seen_files or seen_files[-1] != f:
            assert f not in seen_files, f"tour hop {f}:{name} goes back to {f}, left earlier"
            seen_files.append(f)
        line = DEFS[f][name]
        assert line > last.get(f, 0), f"tour hop {f}:{name} goes back up {f}"
        last[f] = line


def test_tour_hops_exist_and_go_file_by_file_downwards():
    check_hops(tour())


def test_every_backticked_name_in_the_tour_exists():
    flags = set(re.findall(r'"(--\w+)"', open(os.path.join(ROOT, "generate.py")).read()))
    for token in re.findall(r"`([^`]+)`", tour()):
        if re.fullmatch(r"[\w.]+\.py:[\w.]+", token):
            continue                                                   # hops: the test above
        if re.fullmatch(r"[\w./]+\.py", token):
            assert os.path.exists(os.path.join(ROOT, token)), token
        elif token.startswith("python "):                             # a command: its script and flags exist
            words = token.split()
            assert os.path.exists(os.path.join(ROOT, words[1])), token
            assert all(w in flags for w in words[2:] if w.startswith("--")), token
        elif token.startswith("--"):
            assert token.split()[0] in flags, f"README tour names flag {token}, which generate.py does not have"
        elif re.fullmatch(r"\[[\w, ]+\]", token) or re.fullmatch(r'"\w+"', token):
            continue                                                   # a shape ([B, T]) or a cache name
        else:
            name = re.sub(r"\(.*\)$", "", token.split(" = ")[0])       # `f(x)` -> f, `salient_ratio` = 50% -> name
            for part in name.split("."):
                assert part in ALL_NAMES or part in ("cache",), f"README tour names `{token}`: {part!r} is not in the code"


def test_the_check_catches_a_stale_or_backward_hop():
    import pytest
    good = tour()
    with pytest.raises(AssertionError, match="no such function"):
        check_hops(good.replace("`cache.py:ZipCache._append_block`", "`cache.py:ZipCache._append_one_block`"))
    with pytest.raises(AssertionError, match="goes back up"):
        check_hops(good.replace("`cache.py:ZipCache._flush`", "`cache.py:ZipCache._prefill`"))
