"""A script's config: a commented dataclass read from the command line (`--key value`, type-checked,
`--help` from the field comments), and the recipe in force: the paper's defaults, or the values a base
model folder carries in its recipe.json for its own scale (each with its reason, printed and saved).

Run: a library (harness.py, the training scripts and the study tools read their config through it).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path

from plumbing.jsonfiles import read_json
from plumbing.model_files import portable_path, repo_path


# ---------------------------------------------------------------------- config from the CLI
def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def field_comments(cls) -> dict[str, str]:
    """{field: the comment beside it in the dataclass source (and its comment-only continuation lines)},
    over cls and its bases, so that --help says what the config at the top of a script says."""
    names, comments = {f.name for f in dataclasses.fields(cls)}, {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        name = None
        for line in inspect.getsource(klass).splitlines():
            field_line = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
            if field_line and field_line.group(1) in names:
                name = field_line.group(1)
                comments[name] = field_line.group(2) or ""
            elif name and line.strip().startswith("#"):
                comments[name] += " " + line.strip().lstrip("#").strip()
            else:
                name = None
    return {k: v.strip() for k, v in comments.items() if v.strip()}


def _parser(cls, suppress: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0],
                                 argument_default=argparse.SUPPRESS if suppress else None)
    hints, comments = typing.get_type_hints(cls), ({} if suppress else field_comments(cls))
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        kw = {} if suppress else {"default": default}
        shown = default if tp is bool or typing.get_origin(tp) in (list, tuple) else repr(default)
        # argparse formats help with %: a literal % in a comment is doubled
        help_text = f"{comments[f.name]} (default {shown})" if f.name in comments else f"default {shown}"
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            ap.add_argument(*names, dest=f.name, type=_parse_bool, nargs="?", const=True,
                            help=help_text, **kw)
        elif typing.get_origin(tp) in (list, tuple):
            ap.add_argument(*names, dest=f.name, type=typing.get_args(tp)[0], nargs="+",
                            help=help_text, **kw)
        else:
            ap.add_argument(*names, dest=f.name, type=tp, help=help_text, **kw)
    return ap


def parse_config(cls, argv=None):
    """Build dataclass `cls` from `--key value` / `--key=value` (hyphens or underscores).

    Types are checked by argparse from the annotations; an unknown key is an error; bool fields
    accept a bare `--flag`; list fields take several values (`--teachers a b c`).
    """
    return cls(**vars(_parser(cls, suppress=False).parse_args(argv)))


def given_keys(cls, argv=None) -> set[str]:
    """The config keys set on the command line (a recipe never overrides those)."""
    return set(vars(_parser(cls, suppress=True).parse_args(argv)))


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _with_flags(command: str, **values) -> str:
    """`command` with each --key set to its value (replacing any --key of it) and without --resume."""
    import shlex
    words, out = shlex.split(command), []
    skip = False
    for w in words:
        name = w.removeprefix("--").split("=")[0].replace("-", "_") if w.startswith("--") else None
        if skip and not w.startswith("--"):
            continue
        skip = name in values or name == "resume"
        if not skip:
            out.append(w)
    return " ".join([shlex.join(out), *(_flag(k, v) for k, v in values.items())])


def _flag(key: str, value) -> str:
    """`--key value` as a command line takes it (lists as several values, quoted for a shell)."""
    import shlex
    values = value if isinstance(value, list) else [value]
    text = " ".join(shlex.quote(str(v).lower() if isinstance(v, bool) else str(v)) for v in values)
    return f"--{key} {text}".rstrip()


def require(ok: bool, message: str) -> None:
    """A user-input check: ValueError(message) unless ok (scripts turn it into a one-line error)."""
    if not ok:
        raise ValueError(message)


def require_positive(cfg, *names: str) -> None:
    for name in names:
        require(getattr(cfg, name) > 0, f"--{name} must be > 0, got {getattr(cfg, name)}")


# ---------------------------------------------------------------------- the recipe in force
def apply_values(cfg, given: set[str], values: dict[str, tuple]) -> dict[str, tuple]:
    """Set each `values[key] = (value, reason)` on cfg where the key is still at its dataclass default
    and the command line did not set it (so applying twice changes nothing, and a flag always wins).
    Returns {key: (default, value, reason)} of what was changed."""
    defaults = type(cfg)()
    kept = set(given) | {f.name for f in dataclasses.fields(cfg)
                         if getattr(cfg, f.name) != getattr(defaults, f.name)}
    changed = {}
    for key, (value, reason) in values.items():
        if key not in kept and getattr(cfg, key) != value:
            changed[key] = (getattr(cfg, key), value, reason)
            setattr(cfg, key, value)
    return changed


RECIPE_FILE = "recipe.json"  # a base model folder's own recipe (values for its scale, with reasons)


def recipe_of(cfg, model: str) -> tuple[str, dict]:
    """The recipe cfg.recipe names: "auto" is the model folder's recipe.json if it has one, else the
    paper's; "paper" is none; a path is that recipe file. Returns (its name as saved, its contents)."""
    if cfg.recipe == "paper":
        return "paper", {}
    path = Path(repo_path(model)) / RECIPE_FILE if cfg.recipe == "auto" else Path(repo_path(cfg.recipe))
    if cfg.recipe == "auto" and not path.is_file():
        return "paper", {}
    if not path.is_file():
        raise ValueError(f"--recipe must be auto, paper or the path of a recipe.json, got {cfg.recipe!r} "
                         "(no such file)")
    return portable_path(str(path)), read_json(path, "recipe file")


def apply_recipe(cfg, given: set[str], model: str, script: str) -> dict[str, tuple]:
    """Set the values of the recipe in force (recipe_of) for `script` to the keys still at their default
    that the command line did not set (apply_values); its "datasets" give a Stage-1 task its prompt
    folder when --dataset is not given. Returns {key: (default, value, reason)} of what was changed;
    cfg.recipe holds the resolved name (saved in config.json)."""
    cfg.recipe, recipe = recipe_of(cfg, model)
    values = {key: (v["value"], v["reason"]) for key, v in recipe.get(script, {}).items()}
    datasets = recipe.get("datasets", {})
    if hasattr(cfg, "dataset") and cfg.task in datasets.get("value", {}):
        values["dataset"] = (datasets["value"][cfg.task], datasets["reason"])
    return apply_values(cfg, given, values)


def describe_recipe(cfg, changed: dict[str, tuple]) -> str:
    """The lines printed at start: which recipe is in force and every value it changed, with why."""
    if cfg.recipe == "paper":
        return "recipe: the paper's (every default as in paper sections 7-8)"
    lines = [f"recipe: {cfg.recipe} (--recipe paper for the paper's values), {len(changed)} values differ:"]
    lines += [f"  {key} = {value!r} (paper {default!r}): {reason}"
              for key, (default, value, reason) in changed.items()]
    return "\n".join(lines)
