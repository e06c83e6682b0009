"""tests/plumbing/test_faults.py's runner: one teacher_rl.py run (python tests/plumbing/fault_runner.py FAULT ARGV...) with a
fault injected at the end of a step (RunDir.log, which every rank calls once per step):
    sigterm:R:S   rank R sends itself SIGTERM as step S ends (a scheduler's preemption notice)
    freeze:R:S    rank R stops (SIGSTOP) as step S ends: a rank that no longer answers
    none          no fault
Several ranks are started by the test as plain processes with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so that it controls each one."""
import os
import signal
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (2, 1, 0)]  # the repository, tests/ (helpers), here

import helpers  # noqa: E402,F401  (registers the test rewards)
import teacher_rl  # noqa: E402
from plumbing import rundir  # noqa: E402

fault, argv = sys.argv[1], sys.argv[2:]
if fault != "none":
    kind, rank, at = fault.split(":")
    real_log = rundir.RunDir.log

    def log(self, metrics, images=None):
        real_log(self, metrics, images)
        if metrics.get("step") == int(at) and int(os.environ.get("RANK", 0)) == int(rank):
            os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGSTOP)
    rundir.RunDir.log = log
teacher_rl.main(argv)
