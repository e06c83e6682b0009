"""The distributed helper: rank, world and device from torchrun's environment (plain `python` is a world
of 1), gloo on CPU and NCCL on CUDA, a collective timeout that names the rank that stopped answering,
first-use downloads once per node, and printing on the main rank only.

Run: a library (student.py and every script that runs on several ranks).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as tdist


# ---------------------------------------------------------------------- distributed
_DIAGNOSIS: dict = {}  # the gloo group and its wait (seconds) that _stuck_ranks uses
FIRST_USE_WAIT_S = 6 * 3600  # how long the other ranks of a node wait for local rank 0's first-use downloads


class Dist:
    """Rank/world/device from torchrun's environment; a no-op world of 1 under plain python.

    plan_only (a --dry_run): `--device cuda` on a machine without a GPU names the device the run will
    have, so that the plan is made for it; nothing runs there."""

    def __init__(self, device: str = "auto", plan_only: bool = False, timeout_s: float = 1800.0):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        indexed = device.startswith("cuda:") and device[5:].isdigit()
        if device not in ("auto", "cpu", "cuda") and not indexed:
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if use_cuda and not torch.cuda.is_available() and not plan_only:
            raise ValueError(f"--device {device}: no CUDA device is available here; "
                             "use --device cpu (or auto)")
        index = int(device[5:]) if indexed else self.local_rank
        if use_cuda and torch.cuda.is_available():
            if index >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA devices")
            torch.cuda.set_device(index)
        self.device = torch.device("cuda", index) if use_cuda else torch.device("cpu")
        if self.world > 1 and not tdist.is_initialized():
            # a collective that waits longer than timeout_s raises (NCCL: in the main thread, blocking wait)
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            nccl = use_cuda and torch.cuda.is_available()
            tdist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        if self.world > 1 and tdist.is_initialized() and "group" not in _DIAGNOSIS:
            # side groups of gloo: one on which a timed-out rank asks which ranks stopped answering, one on
            # which a node's ranks wait for its first-use downloads (longer than a collective may take)
            _DIAGNOSIS.update(group=tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)),
                              wait_group=tdist.new_group(backend="gloo",
                                                         timeout=datetime.timedelta(seconds=FIRST_USE_WAIT_S)),
                              timeout_s=min(30.0, timeout_s))
        self.is_main = self.rank == 0

    def split(self, n_global: int, what: str, flag: str = "") -> slice:
        """This rank's contiguous share of `n_global` items; a one-line error naming the values that divide
        (and what each gives per GPU) if they do not."""
        if n_global % self.world:
            lo, hi = n_global // self.world * self.world, (n_global // self.world + 1) * self.world
            use = " or ".join(f"{flag} {n} ({n // self.world} per GPU)" for n in (lo, hi) if n)
            raise ValueError(f"{what} = {n_global} does not divide over {self.world} ranks: use {use}")
        per = n_global // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    @contextlib.contextmanager
    def local_first(self):
        """Run the block on each node's local rank 0 first, then on the node's other ranks: a first-use
        download (a hub model, a reward's weights) happens once per node, and the others read the cache.
        Every rank passes one barrier, also when the block fails on local rank 0."""
        ranks = self.world > 1 and tdist.is_initialized() and "wait_group" in _DIAGNOSIS
        # a download may take longer than --collective_timeout_s: this barrier (on a side group of gloo) waits
        # up to FIRST_USE_WAIT_S
        if ranks and self.local_rank != 0:
            tdist.barrier(_DIAGNOSIS["wait_group"])
        try:
            yield
        finally:
            if ranks and self.local_rank == 0:
                tdist.barrier(_DIAGNOSIS["wait_group"])

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped per-rank tensors along dim 0, in rank order."""
        if self.world == 1:
            return x
        out = [torch.empty_like(x) for _ in range(self.world)]
        tdist.all_gather(out, x.contiguous())
        return torch.cat(out)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            tdist.all_reduce(x)
        return x

    def average_gradients(self, params) -> None:
        """grad <- mean over ranks, for every trainable parameter, in one flat all-reduce."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        tdist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def barrier(self):
        if self.world > 1:
            tdist.barrier()

    def close(self):
        if self.world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


def print_main(dist: Dist, *lines: str) -> None:
    if dist.is_main:
        print(*lines, sep="\n", file=sys.stderr, flush=True)
