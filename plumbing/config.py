"""A script's config: a dataclass read from the command line (`--key value`, type-checked, `--help` from each
field's own help text: `option(default, "help")`), and the recipe in force: the paper's defaults, or the
values a base model folder carries in its recipe.json for its own scale (each with its reason, printed and
saved).

Run: a library (student.py, the training scripts and the study tools read their config through it).
"""
from __future__ import annotations

import argparse
import dataclasses
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


def option(default=dataclasses.MISSING, help: str = "", *, factory=None):
    """A config field with its --help text, kept in the field's metadata: `lr: float = option(3e-4, "...")`;
    a list default is built per config by `factory` (dataclasses.field's default_factory)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _split(value: str) -> list[str]:
    """One command-line word of a list option: `a,b,c` is three values; a word holding "=" or whitespace is
    one (a TASK=SPEC entry may hold commas, a prompt commas and spaces)."""
    if "=" in value or any(c.isspace() for c in value) or "," not in value:
        return [value]
    return [part for part in value.split(",") if part]


def _list_of(element):
    """The argparse action of a list option: `--x a b c` and `--x a,b,c` give the same list (_split)."""
    class ListOption(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            words = [part for value in values for part in _split(value)]
            try:
                setattr(namespace, self.dest, [element(w) for w in words])
            except ValueError:
                parser.error(f"argument {option_string}: invalid {element.__name__} value in {' '.join(values)!r}")
    return ListOption


def _parser(cls, suppress: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0],
                                 argument_default=argparse.SUPPRESS if suppress else None)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        kw = {} if suppress else {"default": default}
        shown = default if tp is bool or typing.get_origin(tp) in (list, tuple) else repr(default)
        # argparse formats help with %: a literal % in a comment is doubled
        help_text = f"{f.metadata['help']} (default {shown})" if f.metadata.get("help") else f"default {shown}"
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            ap.add_argument(*names, dest=f.name, type=_parse_bool, nargs="?", const=True,
                            help=help_text, **kw)
        elif typing.get_origin(tp) in (list, tuple):
            ap.add_argument(*names, dest=f.name, action=_list_of(typing.get_args(tp)[0]), nargs="+",
                            help=help_text, **kw)
        else:
            ap.add_argument(*names, dest=f.name, type=tp, help=help_text, **kw)
    return ap


def parse_config(cls, argv=None):
    """Build dataclass `cls` from `--key value` / `--key=value` (hyphens or underscores).

    Types are checked by argparse from the annotations; an unknown key is an error; bool fields
    accept a bare `--flag`; list fields take several values (`--teachers a b c` or `--teachers a,b,c`).
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
# Where a setting comes from, the later winning: the dataclass default (the paper's), the base model
# folder's recipe.json, the named recipes a script applies (GRPO-Guard's with --ratio_norm), the command
# line. A value a caller set in code (a config built with other values than the defaults) counts as given.
RECIPE_FILE = "recipe.json"  # a base model folder's own recipe (values for its scale, with reasons)


def base_recipe(model: str) -> dict:
    """The recipe.json a base model folder carries ({} if none, or for a hub id)."""
    path = Path(repo_path(model)) / RECIPE_FILE
    return read_json(path, "recipe file") if path.is_file() else {}


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


def apply_recipe(cfg, given: set[str], model: str, script: str, named: list[str] = ()) -> dict[str, tuple]:
    """Set the values of the recipes in force for `script`, in order of precedence: the base's (recipe_of;
    its "datasets" give a Stage-1 task its prompt folder when --dataset is not given), then each recipe
    file of `named`; never a key of `given` (the command line) or one a caller set in code (not at its
    default). Returns {key: (default, value, source, reason)} of what was changed; cfg.recipe holds the
    resolved name of the base's (saved in config.json)."""
    cfg.recipe, recipe = recipe_of(cfg, model)
    layers = [(cfg.recipe, recipe)] + [(portable_path(p), read_json(Path(repo_path(p)), "recipe file")) for p in named]
    defaults = type(cfg)()
    kept = set(given) | {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    changed = {}
    for source, values in layers:
        values = {key: (v["value"], v["reason"]) for key, v in values.get(script, {}).items()}
        datasets = recipe.get("datasets", {}) if source == cfg.recipe else {}
        if hasattr(cfg, "dataset") and cfg.task in datasets.get("value", {}):
            values["dataset"] = (datasets["value"][cfg.task], datasets["reason"])
        for key, (value, reason) in values.items():
            if key not in kept and getattr(cfg, key) != value:
                changed[key] = (getattr(defaults, key), value, source, reason)
                setattr(cfg, key, value)
    return {key: c for key, c in changed.items() if getattr(defaults, key) != c[1]}


def describe_recipe(cfg, changed: dict[str, tuple], given: set[str] = frozenset()) -> str:
    """The lines printed at start: where every value that differs from the paper's comes from (a recipe,
    with its reason, or the command line)."""
    defaults = type(cfg)()
    flags = {key: getattr(cfg, key) for key in sorted(given) if key not in changed and key != "recipe" and
             getattr(cfg, key) != getattr(defaults, key)}
    if cfg.recipe == "paper" and not changed:
        head = "recipe: the paper's (every default as in paper sections 7-8)"
    else:
        head = f"recipe: {cfg.recipe} (--recipe paper for the paper's values)"
    lines = [f"{head}; {len(changed) + len(flags)} values differ from the paper's:" if changed or flags else head]
    lines += [f"  {key} = {value!r} (paper {default!r}) from {source}: {reason}"
              for key, (default, value, source, reason) in changed.items()]
    lines += [f"  {key} = {value!r} (paper {getattr(defaults, key)!r}) from the command line"
              for key, value in flags.items()]
    return "\n".join(lines)
