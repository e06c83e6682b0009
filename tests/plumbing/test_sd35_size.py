"""docs/sd35.md's commands at SD3.5-Medium's real size: each command's own --dry_run, as rank 0 of the
paper's 8 ranks (its per-GPU batch), planned for an 80 GB card (the 79.6 GiB torch.cuda reports for an
H100-80GB) on SD3.5-M's configuration (tests/fixtures/sd35m_config, every module built on the meta device),
the base given as a local folder and as a hub id in a stand-in hub cache (bench/sd35_plans.py). Each must
resolve to bfloat16 weights, train and evaluate at 512 px, and have a predicted peak that fits the card.
The plans printed here are the ones docs/bench.md quotes (`python -m bench.sd35_plans`)."""
import re

import pytest

from bench.sd35_plans import CARDS, dry_run, page_commands, plan_line, stand_in

CARD = CARDS["80 GB"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd35-size")
    return root, stand_in(root)


COMMANDS = [c for c in page_commands() if c[0] == "torchrun"]


@pytest.mark.parametrize("base", ["hub", "folder"])
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[" ".join(c[2:4]) for c in COMMANDS])
def test_every_sd35_command_plans_bfloat16_at_512_px_within_an_80_gb_card(world, base, index):
    root, env = world
    printed, config = dry_run(COMMANDS[index], root, env, CARD, world=8, base=base)
    assert config["dtype"] == "bfloat16", config["dtype"]
    assert (config["height"], config["width"]) == (512, 512)  # the run's training and evaluation resolution
    header = re.search(r"^memory plan \((\w+) at (\d+)x(\d+) px, (\w+), (\d+) ranks; budget ([\d.]+) GiB",
                       printed, re.M)
    assert header and header.groups()[1:] == ("512", "512", "bfloat16", "8", f"{CARD:.1f}"), printed
    peak = float(re.match(r"predicted peak ([\d.]+) GiB of ([\d.]+) GiB \((.*)\)$", plan_line(printed)).group(1))
    assert peak <= CARD, plan_line(printed)
    # what the plan chose is what the run's config holds
    chosen = dict(kv.rsplit(" ", 1) for kv in re.search(r"\((.*)\)$", plan_line(printed)).group(1).split(", "))
    for key, value in chosen.items():
        assert str(config[key]).lower() == {"on": "true", "off": "false"}.get(value, value), (key, value)
