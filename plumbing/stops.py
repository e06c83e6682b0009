"""The one-line stops: how a run ends when it cannot go on. Ctrl-C, SIGTERM (a scheduler's preemption
notice), a full disk during a save, and a rank that stopped answering end the run with one line that
says what was kept and the command that resumes; bad input ends it with one line naming the problem
(`fail`), and a run folder the process created for nothing is removed either way.

Used by every script's main() (`@one_line_stops`) and by the trained student (student.StudentTrainer
reads the SIGTERM flag at the end of each step and raises `Terminated`).

Run: a library.
"""
from __future__ import annotations

import datetime
import errno
import functools
import os
import re
import sys
import typing

import torch.distributed as tdist
from safetensors import SafetensorError

from plumbing.config import _with_flags
from plumbing.dist import _DIAGNOSIS
from plumbing.rundir import _CLAIMED


def _disk_full(error: BaseException) -> bool:
    """A full disk, however the writer reports it: ENOSPC, its message, or torch.save's RuntimeError
    ("PytorchStreamWriter failed writing file ...: file write failed"), which carries no errno."""
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or \
        (isinstance(error, RuntimeError) and "PytorchStreamWriter failed writing" in text)


class Terminated(Exception):
    """SIGTERM arrived and the run saved the steps done (StudentTrainer.stop_if_terminated)."""


_SIGTERM = {"received": False}  # set by the handler one_line_stops installs; read at the end of each step


def sigterm_received() -> bool:
    """Whether SIGTERM arrived since the script's main() started (one_line_stops' handler)."""
    return _SIGTERM["received"]


def one_line_stops(main):
    """Decorator of a script's main(): Ctrl-C, SIGTERM (a scheduler's preemption notice), a full disk during a
    save, or a rank that stops answering end the run with one line that says what was kept and the
    command that resumes (exit 130 after Ctrl-C, 143 after SIGTERM, 1 otherwise). SIGTERM lets the step it
    arrives in finish, saves it, then stops: no step done is lost. The newest complete checkpoint is never
    touched (RunDir.save, publish_dir)."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        import signal
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.update(received=True)) \
            if threading_main() else None
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            _stop("interrupted", 130)
        except Terminated:
            _stop("terminated (SIGTERM) at the end of a step", 143)
        except (OSError, SafetensorError, RuntimeError) as e:
            if _disk_full(e):
                _stop("the disk is full", 1, "free some space, then ")
            if _timed_out(e):
                _stop(f"a collective timed out: {_stuck_ranks()} did not answer within --collective_timeout_s "
                      f"(stopped, hung or killed)", 1)
            raise
        finally:
            _SIGTERM["received"] = False
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return wrapped


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _timed_out(error: BaseException) -> bool:
    """A collective's timeout, as gloo and NCCL (blocking wait) report it."""
    text = str(error).lower()
    return tdist.is_initialized() and ("timed out" in text or "timeout" in text)


def _stuck_ranks() -> str:
    """Which ranks stopped answering: gloo's monitored barrier on the side group Dist made for this, which
    names the ranks that do not arrive (every live rank reaches it after its own timeout)."""
    group = _DIAGNOSIS.get("group")
    if group is None:
        return "another rank"
    try:
        tdist.monitored_barrier(group, timeout=datetime.timedelta(seconds=_DIAGNOSIS["timeout_s"]),
                                wait_all_ranks=True)
    except RuntimeError as e:
        found = re.findall(r"[Rr]anks? ([\d, ]+) failed", str(e))
        if found:
            return "rank " + found[0].strip().rstrip(",")
    return "another rank"


def _stop(what: str, code: int, then: str = "") -> typing.NoReturn:
    run = next((r for r in reversed(_CLAIMED) if r.command), None)
    if run is None:
        line = f"{what}; nothing was written"
    elif run.saved_step:
        lost = "(it holds every step done)" if code == 143 else "is intact (steps after it are lost)"
        line = (f"{what}: the checkpoint of step {run.saved_step} in {run.checkpoint} {lost}; "
                f"{then}resume with: {_with_flags(run.command)} --resume")
    else:
        line = f"{what} before the first checkpoint; {then}start again with: {_with_flags(run.command)}"
    for r in list(_CLAIMED):
        r.release(remove_if_unused=True)
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr, flush=True)
    raise SystemExit(code)


def fail(error: Exception) -> typing.NoReturn:
    """End the process with a one-line error (the scripts' bad-input path): printed by rank 0 only (every
    rank fails with it), and a run folder this process created for nothing is removed."""
    for run in list(_CLAIMED):
        run.release(remove_if_unused=True)
    if int(os.environ.get("RANK", 0)) != 0:
        raise SystemExit(1)
    raise SystemExit(f"error: {error}") from None
