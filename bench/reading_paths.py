"""Reading paths: the lines and files a reader follows through the code for one question, counted from the
code's syntax trees (nothing is run), so that a change of layout can be measured before and after.

A path starts at a function (or at the body of its training loop) and follows every call it can resolve
to a project function, depth first, each function once: a bare name defined in the module or imported
from a project module, `module.f` of an imported project module, `self.f` in a class, `Class.f`,
`Class(...)` (its __init__), and `obj.f` when exactly one project class defines a method f. A function
that calls the path's stop function is counted up to that call, and only its calls before it are followed.
Counted: the lines of each function visited (def to its last line, docstring included), the files they are
in, and the moves between files (a call whose callee is in another file than its caller). Not followed:
calls into libraries, attribute calls whose method name two project classes share (e.g. `run.log`,
`model.velocity` are resolved; `x.save` is not when two classes define save), and dataclass bodies.

Run:
    python -m bench.reading_paths                      # this checkout, every project function
    python -m bench.reading_paths --skip plumbing rewards opd_inputs stage1.validate   # the algorithm's path
    python -m bench.reading_paths --root /tmp/old      # another checkout (e.g. a `git worktree` of an older commit)
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

FOLDERS = ("plumbing", "rewards", "study", "toy")
PATHS = {  # question: (start "module:function[:loop]", stop "module:function" or "")
    "main() to the first OPD round": ("opd:main", "opd:opd_round"),
    "one OPD round": ("opd:opd_round", ""),
    "one Flow-GRPO step": ("teacher_rl:main:loop", ""),
    "one NFT step": ("nft:main:loop", ""),
}


class Code:
    """The project's functions and imports, read from its files."""

    def __init__(self, root: Path):
        files = [*root.glob("*.py"), *(p for f in FOLDERS for p in (root / f).glob("*.py"))]
        self.root, self.funcs, self.imports, self.classes, self.methods = root, {}, {}, {}, {}
        for path in files:
            mod = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
            tree = ast.parse(path.read_text())
            self.imports[mod] = {}
            for node in tree.body:
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    for a in node.names:
                        self.imports[mod][a.asname or a.name] = (node.module, a.name)
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        self.imports[mod][a.asname or a.name] = (a.name, None)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.funcs[(mod, node.name)] = (path, node)
                elif isinstance(node, ast.ClassDef):
                    self.classes[(mod, node.name)] = node
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            self.funcs[(mod, f"{node.name}.{item.name}")] = (path, item)
                            self.methods.setdefault(item.name, []).append((mod, f"{node.name}.{item.name}"))
            for node in ast.walk(tree):  # imports inside functions count too
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node not in tree.body:
                    for a in node.names:
                        self.imports[mod].setdefault(a.asname or a.name, (node.module, a.name))

    def _name(self, mod: str, name: str):
        """The project function or class `name` means in module `mod` (following imports), or None."""
        for _ in range(5):
            if (mod, name) in self.funcs:
                return (mod, name)
            if (mod, name) in self.classes:
                return (mod, f"{name}.__init__") if (mod, f"{name}.__init__") in self.funcs else None
            src = self.imports.get(mod, {}).get(name)
            if not src or src[1] is None:
                return None
            mod, name = src
            if f"{mod}.{name}" in self.imports:  # `from pkg import module`
                return None
        return None

    def resolve(self, mod: str, cls: str | None, call: ast.Call, func: ast.FunctionDef):
        f = call.func
        if isinstance(f, ast.Name):
            args = func.args
            named = [*args.posonlyargs, *args.args][-len(args.defaults):] if args.defaults else []
            hooks = {a.arg: d for a, d in zip(named, args.defaults)}
            hooks.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
            if isinstance(hooks.get(f.id), ast.Name):  # a hook parameter: its default is what runs
                return self._name(mod, hooks[f.id].id)
            return self._name(mod, f.id)
        if not isinstance(f, ast.Attribute):
            return None
        if isinstance(f.value, ast.Name):
            base = f.value.id
            if base in ("self", "cls") and cls and (mod, f"{cls}.{f.attr}") in self.funcs:
                return (mod, f"{cls}.{f.attr}")
            src = self.imports.get(mod, {}).get(base)
            if src:
                target = src[0] if src[1] is None else f"{src[0]}.{src[1]}"
                if target in self.imports:  # a project module
                    return self._name(target, f.attr)
                if src[1] is not None and (src[0], src[1]) in self.classes:
                    key = (src[0], f"{src[1]}.{f.attr}")
                    return key if key in self.funcs else None
            if (mod, base) in self.classes and (mod, f"{base}.{f.attr}") in self.funcs:
                return (mod, f"{base}.{f.attr}")
        owners = self.methods.get(f.attr, [])
        return owners[0] if len(owners) == 1 else None


def _calls(node: ast.AST) -> list[ast.Call]:
    return sorted((n for n in ast.walk(node) if isinstance(n, ast.Call)), key=lambda c: (c.lineno, c.col_offset))


def walk(code: Code, start: str, stop: str, skip: tuple[str, ...] = ()) -> dict:
    """The functions, lines, files and file moves of one reading path (module docstring)."""
    mod, name, *loop = start.split(":")
    stop_key = tuple(stop.split(":")) if stop else None
    seen, lines, files, moves, visited = set(), 0, [], 0, []

    def visit(key, region=None, caller_file=None):
        nonlocal lines, moves
        if key in seen or key == stop_key:
            return
        seen.add(key)
        path, node = code.funcs[key]
        if caller_file is not None and path != caller_file:
            moves += 1
        if path not in files:
            files.append(path)
        region = region or node
        first, last = region.lineno, region.end_lineno
        calls = _calls(region)
        cls = key[1].split(".")[0] if "." in key[1] else None
        stops = [c for c in calls if stop_key and code.resolve(key[0], cls, c, node) == stop_key]
        if stops:
            last = stops[0].lineno
            calls = [c for c in calls if c.lineno < last or c is stops[0]]
        lines += last - first + 1
        visited.append(f"{key[0]}.{key[1]} {last - first + 1}")
        for c in calls:
            target = code.resolve(key[0], cls, c, node)
            if target and target in code.funcs and not f"{target[0]}.{target[1]}".startswith(skip):
                visit(target, caller_file=path)

    key = (mod, name)
    region = None
    if loop:
        region = next(n for n in ast.walk(code.funcs[key][1]) if isinstance(n, ast.For))
    visit(key, region)
    return {"functions": len(seen), "lines": lines, "files": [p.relative_to(code.root).as_posix() for p in files],
            "moves": moves, "visited": visited}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout to read")
    ap.add_argument("--skip", nargs="*", default=[], help="modules or functions (prefixes of module.function) not "
                                                        "entered, e.g. plumbing or stage1.validate: a call into "
                                                        "them counts as the caller's line only")
    ap.add_argument("--list", action="store_true", help="also list each path's functions and their lines")
    args = ap.parse_args(argv)
    code = Code(Path(args.root))
    print("| path | lines | functions | files | moves between files |\n|---|---|---|---|---|")
    for question, (start, stop) in PATHS.items():
        r = walk(code, start, stop, tuple(args.skip))
        print(f"| {question} | {r['lines']} | {r['functions']} | {len(r['files'])} ({', '.join(r['files'])}) | "
              f"{r['moves']} |")
        if args.list:
            print("  " + ", ".join(r["visited"]))


if __name__ == "__main__":
    main()
