"""Run several scripts' main() one after another in one torchrun launch (tests/plumbing/test_ranks.py): one
start-up for every 2-rank comparison instead of one each.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/plumbing/ranks_runner.py JOBS.json OUT.json

JOBS.json: [{"name", "module", "argv"}]. Every all_reduce of each job is recorded (its numel), and rank r
writes {name: [numel, ...]} to OUT.json.r. The process group is created once by the first job's
dist.Dist and kept for all jobs (gloo cannot be created again after it is destroyed), so Dist.close
is a no-op here until the end.
"""
import importlib
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (2, 1, 0)]  # the repository, tests/ (helpers), here

import torch.distributed as tdist  # noqa: E402

import helpers  # noqa: E402,F401  (registers the test rewards)
from plumbing import dist  # noqa: E402

dist.Dist.close = lambda self: None
calls, real_all_reduce = [], tdist.all_reduce


def counted(tensor, *args, **kwargs):
    calls.append(tensor.numel())
    return real_all_reduce(tensor, *args, **kwargs)


tdist.all_reduce = counted
record = {}
for job in json.loads(Path(sys.argv[1]).read_text()):
    calls.clear()
    importlib.import_module(job["module"]).main(job["argv"])
    record[job["name"]] = list(calls)
Path(f"{sys.argv[2]}.{tdist.get_rank()}").write_text(json.dumps(record))
tdist.barrier()
tdist.destroy_process_group()
