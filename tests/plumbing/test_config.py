"""plumbing/config.py: config parsing, list options, --help; the run folder's identity checks on resume (plumbing/rundir.py)."""
import dataclasses
import json

import pytest

from plumbing.config import option, parse_config
from plumbing.dist import Dist
from plumbing.rundir import RunDir


@dataclasses.dataclass
class Cfg:
    """A toy config."""
    lr: float = 0.1
    names: list[str] = dataclasses.field(default_factory=list)
    flag: bool = False
    steps: int = 3
    resume: bool = False


def test_parse_config_types_hyphens_lists_and_unknown_keys():
    cfg = parse_config(Cfg, ["--lr=0.5", "--names", "a", "b", "--flag", "--steps", "7"])
    assert cfg == Cfg(lr=0.5, names=["a", "b"], flag=True, steps=7)
    assert parse_config(Cfg, ["--flag", "false"]).flag is False
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--nope", "1"])
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--steps", "x"])


def test_a_list_option_takes_spaces_or_commas_and_keeps_specs_and_prompts_whole():
    assert parse_config(Cfg, ["--names", "a,b", "c"]).names == ["a", "b", "c"] == \
        parse_config(Cfg, ["--names", "a", "b", "c"]).names
    kept = ["ocr=pickscore=0.5,clipscore=0.5", "a cat, a dog"]  # a TASK=SPEC entry, a prompt
    assert parse_config(Cfg, ["--names", *kept]).names == kept
    assert parse_config(Derived, ["--ints", "0,1", "2"]).ints == [0, 1, 2]
    with pytest.raises(SystemExit):
        parse_config(Derived, ["--ints", "0,x"])


@dataclasses.dataclass
class Derived(Cfg):
    """A config whose fields carry their help, one inherited."""
    noise: float = option(0.7, "a in Eq. 5, 100% of it")
    detach: bool = option(False, "ablation: sg(v_u); default: attached")
    plain: int = 1              # a comment is no help text: --help reads the field, not the source
    ints: list[int] = dataclasses.field(default_factory=list)


def test_help_shows_each_fields_help_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(Derived, ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "a in Eq. 5, 100% of it (default 0.7)" in text
    assert "ablation: sg(v_u); default: attached (default False)" in text
    assert "--plain PLAIN default 1" in text and "--steps STEPS default 3" in text
    assert "no help text" not in text


def test_teacher_rl_help_says_the_detached_cfg_branch_is_an_ablation(capsys):
    from teacher_rl import TeacherConfig
    with pytest.raises(SystemExit):
        parse_config(TeacherConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ablation: v = sg(v_u) + w (v_c - sg(v_u))" in text and "as Flow-GRPO today (default False)" in text


def _run(tmp_path, *argv):
    """A RunDir for `x.py ARGV` (the keys the command line sets are the ones it gives)."""
    return RunDir(str(tmp_path / "r"), parse_config(Cfg, list(argv)), Dist("cpu"), "x.py", list(argv))


def test_run_dir_refuses_other_runs_and_accepts_fields_added_later(tmp_path):
    _run(tmp_path, "--lr", "0.2").create()
    with pytest.raises(ValueError, match="different run"):
        _run(tmp_path, "--lr", "0.2", "--flag")
    with pytest.raises(ValueError, match="--resume"):
        _run(tmp_path, "--lr", "0.2")
    # given on the command line, a value that trains another run is refused with the flags that resume it
    with pytest.raises(ValueError, match=r"resume it with --flag false, or choose another --out"):
        _run(tmp_path, "--lr", "0.2", "--flag", "--resume")
    _run(tmp_path, "--lr", "0.2", "--steps", "9", "--resume")  # steps may grow
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    del saved["flag"]  # a run saved before `flag` existed: it counts as its default
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    _run(tmp_path, "--lr", "0.2", "--resume")
    with pytest.raises(ValueError, match="--flag false"):
        _run(tmp_path, "--lr", "0.2", "--flag", "--resume")


def test_resume_keeps_the_runs_value_of_what_the_command_line_did_not_set(tmp_path, capsys):
    """A default (or a recipe's value) that changed since the run started: the resume trains on with the
    run's value and says so; the learning rate (a remedy) may change, also said."""
    _run(tmp_path, "--names", "a", "--lr", "0.2").create()
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps({**saved, "flag": True}))  # today's default: False
    run = _run(tmp_path, "--names", "a", "--lr", "0.05", "--resume")
    assert run.cfg["flag"] is True and run.cfg["lr"] == 0.05
    printed = capsys.readouterr().err
    assert "flag = True kept from the run (False is today's recipe or default)" in printed
    assert "lr: 0.2 -> 0.05 (the steps after the checkpoint train with it)" in printed
