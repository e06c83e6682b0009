"""harness.py: config parsing and the run directory's identity checks."""
import dataclasses
import json

import pytest

from harness import Dist, RunDir, parse_config


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


@dataclasses.dataclass
class Derived(Cfg):
    """A config with commented fields, one inherited."""
    noise: float = 0.7       # a in Eq. 5, 100% of it
    detach: bool = False     # ablation: sg(v_u);
                             # default: attached
    plain: int = 1


def test_help_shows_each_fields_comment_with_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(Derived, ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "a in Eq. 5, 100% of it (default 0.7)" in text
    assert "ablation: sg(v_u); default: attached (default False)" in text
    assert "--plain PLAIN default 1" in text and "--steps STEPS default 3" in text


def test_teacher_rl_help_says_the_detached_cfg_branch_is_an_ablation(capsys):
    from teacher_rl import TeacherConfig
    with pytest.raises(SystemExit):
        parse_config(TeacherConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ablation: v = sg(v_u) + w (v_c - sg(v_u))" in text and "as Flow-GRPO today (default False)" in text


def test_run_dir_refuses_other_runs_and_accepts_fields_added_later(tmp_path):
    RunDir(str(tmp_path / "r"), Cfg(lr=0.2), Dist("cpu")).create()
    with pytest.raises(ValueError, match="different run"):
        RunDir(str(tmp_path / "r"), Cfg(lr=0.3, resume=True), Dist("cpu"))
    with pytest.raises(ValueError, match="--resume"):
        RunDir(str(tmp_path / "r"), Cfg(lr=0.2), Dist("cpu"))
    RunDir(str(tmp_path / "r"), Cfg(lr=0.2, steps=9, resume=True), Dist("cpu"))  # steps may grow
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    del saved["flag"]  # a run saved before `flag` existed
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    RunDir(str(tmp_path / "r"), Cfg(lr=0.2, resume=True), Dist("cpu"))
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="flag"):
        RunDir(str(tmp_path / "r"), Cfg(lr=0.2, flag=True, resume=True), Dist("cpu"))
