"""Shared fixtures: a tiny random-weight SD3 pipeline, built offline once per session.

tests/algorithm/: the paper's formulas, samplers, losses, rewards and loops against independent references,
the toy world and the study. tests/plumbing/: config, run folders, checkpoints, faults, ranks, the memory
planner, inputs, layout, benchmarks. A test module may import another's builders by name (both folders
are on sys.path)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS), str(TESTS / "algorithm"), str(TESTS / "plumbing")]

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import helpers  # noqa: E402,F401  (registers the test rewards, e.g. test_brightness)



@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A saved tiny SD3 pipeline folder (random weights), loadable like an SD3.5 folder."""
    from toy.pipeline import build_tiny_pipeline
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_tiny_pipeline(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_model(tiny_pipe_dir):
    from model import FlowModel
    return FlowModel.load(tiny_pipe_dir)


@pytest.fixture
def tiny_model64(tiny_pipe_dir):
    """The tiny pipeline with its transformer, text encoders and LoRAs in float64: a reference where two
    computations of one formula must agree to float64 rounding (~1e-16 relative), whatever the CPU."""
    from model import FlowModel
    return FlowModel.load(tiny_pipe_dir, dtype=torch.float64)
