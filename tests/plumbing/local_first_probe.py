"""tests/plumbing/test_ranks.py's probe of Dist.local_first (plumbing/dist.py), run by tests/plumbing/ranks_runner.py on 2 ranks of one
node: each rank records when it entered and left the block (a stand-in for a first-use download)."""
import json
import time
from pathlib import Path

from plumbing.dist import Dist


def main(argv):
    dist = Dist("cpu")
    with dist.local_first():
        enter = time.time()
        time.sleep(0.3)
        leave = time.time()
    Path(f"{argv[0]}.{dist.rank}").write_text(json.dumps([enter, leave]))
