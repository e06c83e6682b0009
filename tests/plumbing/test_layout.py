"""The code's layout: no import cycle between modules or between folders (every import counted, also
those inside functions), and the core files name no toy: they import nothing from toy/ and mention
it, if at all, only in docstrings (the embedded world carries its own recipe, rewards and prompts)."""
import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("plumbing", "rewards", "toy", "study", "bench")
CORE = tuple(sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("rewards/*.py"),
                                                              *ROOT.glob("plumbing/*.py")]))


def _modules() -> dict[str, Path]:
    """{module name: file} of the project's code: the root files and the packages' files."""
    out = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        out.update({f"{pkg}.{p.stem}": p for p in (ROOT / pkg).glob("*.py") if p.stem != "__init__"})
        init = ast.parse((ROOT / pkg / "__init__.py").read_text()).body
        if any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in init):
            out[pkg] = ROOT / pkg / "__init__.py"  # a package with code of its own (rewards/: the registry)
    return out


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (`from pkg import mod` names pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graphs():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    folder = {}
    for name, targets in graph.items():
        here = name.split(".")[0] if "." in name or name in PACKAGES else "root"
        for t in targets:
            there = t.split(".")[0] if "." in t or t in PACKAGES else "root"
            if there != here:
                folder.setdefault(here, set()).add(there)
    return graph, folder


def test_no_import_cycle_between_modules_or_folders():
    graph, folders = _graphs()
    assert "toy.world" in graph["toy.pretrain"] and "opd" in graph["study.instruments"]  # the walk sees imports
    assert "plumbing.rundir" in graph["student"] and "plumbing.model_files" in graph["model"]
    assert "rewards.clip" in graph["rewards.geneval"] and "rewards" in graph["stage1"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    assert _cycle(folders) is None, f"folder import cycle: {' -> '.join(_cycle(folders))}"
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the detector detects


def _mentions_outside_docstrings(path: Path, word: str) -> list[str]:
    """Lines where `word` occurs in code, strings or comments that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) and \
                isinstance(node.body[0].value.value, str):
            docstrings.add(node.body[0].lineno)
    bad = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if word in tok.string.lower() and tok.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT) and \
                not (tok.type == tokenize.STRING and tok.start[0] in docstrings):
            bad.append(f"{path.name}:{tok.start[0]}: {tok.string[:80]}")
    return bad


def test_the_core_names_no_toy():
    graph, _ = _graphs()
    for name in (f[:-3].replace("/__init__", "").replace("/", ".") for f in CORE):
        if name not in graph:  # a package __init__ that holds only its docstring
            continue
        assert not any(t.startswith("toy.") for t in graph[name]), f"{name} imports {sorted(graph[name])}"
    bad = [line for f in CORE for line in _mentions_outside_docstrings(ROOT / f, "toy")]
    assert not bad, "the core names the toy world outside docstrings:\n" + "\n".join(bad)
    assert _mentions_outside_docstrings(ROOT / "toy" / "world.py", "toy")  # the check finds what is there


def test_each_file_reads_in_one_sitting():
    """A top-level file (the paper's concepts) of at most ~450 lines, a plumbing module of at most ~350."""
    long = {p.name: n for p in ROOT.glob("*.py") if (n := len(p.read_text().splitlines())) > 460}
    long |= {f"plumbing/{p.name}": n for p in (ROOT / "plumbing").glob("*.py")
             if (n := len(p.read_text().splitlines())) > 360}
    assert not long, f"split these by concept: {long}"
