"""A run's folder on disk: the resolved config, one JSONL metrics line per step, checkpoints that survive
a kill at any instant (files written to a temporary folder, a manifest of sizes and SHA-256 written
last, then one rename), exact resume from the newest intact checkpoint, and the lock that keeps two
processes out of one folder. Departures 4 and 6 of student.py are implemented here.

Run: a library (student.StudentTrainer and the training scripts).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plumbing.config import _flag, config_dict, given_keys
from plumbing.dist import Dist, print_main
from plumbing.durable import MANIFEST, publish_dir, read_manifest, sha256, write_atomic, write_manifest
from plumbing.jsonfiles import read_json, read_jsonl
from plumbing.reporting import Trackers, command_line, model_card, parse_report_to


# ---------------------------------------------------------------------- run directory
LOCK = ".lock"                  # out/.lock: held (flock) by the process that runs in out/
_CLAIMED: list["RunDir"] = []   # the run folders this process claimed (fail() removes unused ones)


class RunDir:
    """out/config.json, out/metrics.jsonl, out/checkpoint/ (sealed by a manifest), out/samples/*.png.

    A run directory belongs to one config: reusing it for a different one is an error, reusing it
    without --resume is an error, and --resume continues from the newest complete checkpoint exactly.
    The constructor only checks (before any model loads, writing nothing); `create` writes.
    """

    # keys that may differ between a run and its resumption: what is run, saved, logged and evaluated around
    # the training, and how memory is used (the memory plan may choose anew), not what is trained
    RESUMABLE = ("resume", "steps", "out", "device", "report_to", "wandb_project", "push_to_hub", "dry_run",
                 "collective_timeout_s",
                 "save_every", "eval_every", "eval_prompts", "eval_steps", "max_skipped_steps",
                 "max_memory_gb", "train_chunk", "teacher_chunk", "train_batch", "rollout_batch", "eval_batch",
                 "grad_checkpointing", "offload_text_encoders", "offload_rewards", "compile")
    REMEDIES = ("lr", "grad_clip")  # may change on resume, for the steps after it (a non-finite run's remedy)
    INPUTS = ("model", "teachers", "teacher_task", "teacher_dataset", "teacher_cfg", "teacher_reward", "task",
              "dataset", "reward", "init_lora", "height", "width", "dtype")  # read before the run folder
    SLOTS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")  # where save() leaves complete checkpoints

    def __init__(self, out: str, cfg, dist: Dist, script: str = "", argv: list[str] | None = None):
        self.path, self.dist = Path(out), dist
        self.cfg = config_dict(cfg)
        self.given = given_keys(type(cfg), argv) if script else set()  # the keys the command line set
        self.script, self.command = script, command_line(script, argv) if script else ""
        self.trackers = Trackers([], self.path, {}, 0, False)  # real ones from create()
        self.last_eval: dict = {}
        self.resume_from: Path | None = None
        self.start = 0
        self.saved_step = 0  # the step of the newest complete checkpoint (0: none yet)
        self._created, self._fresh, self._lock_fd = [], False, None  # folders claim() made; a run it starts
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory")
        if not self.cfg.get("dry_run"):
            self.claim()
        try:
            error = None
            try:
                self._check(out, cfg)
            except ValueError as e:
                error = e
            if self.dist.world > 1 and not self.cfg.get("dry_run"):
                self._same_on_every_rank(error is not None)
            if error is not None:
                raise error
        except BaseException:
            self.release(remove_if_unused=True)
            raise
        self.saved_step = self.start

    def _same_on_every_rank(self, failed: bool) -> None:
        """Every rank sees the run folder alike: the same checkpoint step and manifest, or the same
        failure. Ranks on machines without a shared filesystem see different folders and would disagree on
        the step to resume from (and hang); they stop here with one line instead."""
        manifest = self.resume_from / MANIFEST if self.resume_from is not None else None
        digest = int(sha256(manifest)[:12], 16) if manifest and manifest.is_file() else 0
        views = self.dist.all_gather(torch.tensor([[float(failed), self.start, digest]], dtype=torch.float64,
                                                  device=self.dist.device)).cpu()
        if (views != views[0]).any():
            seen = "; ".join(f"rank {r}: step {int(v[1])}" + (" (an error)" if v[0] else "")
                             for r, v in enumerate(views.tolist()))
            raise ValueError(f"the ranks see different run folders at --out {self.path} ({seen}): --resume needs "
                             "--out on a filesystem that every node shares")
        if views[:, 0].any() and not failed:
            raise ValueError("another rank stopped on its input checks (rank 0 names the problem)")

    def _check(self, out: str, cfg) -> None:
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = read_json(cfg_file, "the run's config",
                            "restore it from a copy, or start over with another --out")
            # a field added to the script after the run started counts as its default
            defaults = json.loads(json.dumps(config_dict(type(cfg)())))
            changed = sorted(k for k in set(old) | set(self.cfg) if old.get(k, defaults.get(k)) != self.cfg.get(k)
                             and not (k == "dtype" and old.get(k, "auto") == "auto"))  # saved before resolved
            trained = [k for k in changed if k not in self.RESUMABLE]
            if not self.cfg.get("resume"):
                if trained:
                    raise ValueError(f"output directory {out} holds a different run (config differs in {trained}); "
                                     "choose another --out")
                raise ValueError(f"output directory {out} already holds this run; pass --resume to continue it")
            self._resume_config(out, cfg, {k: old.get(k, defaults.get(k)) for k in changed})
            self._find_checkpoint()
        elif self.path.exists() and any(p.name != LOCK for p in self.path.iterdir()):
            raise ValueError(f"output directory {out} is not empty and holds no run; choose another --out")

    def _resume_config(self, out: str, cfg, saved: dict) -> None:
        """--resume with a config that differs from the run's in `saved` ({key: the run's value}): what does
        not change the training (RESUMABLE) and the remedies (REMEDIES) take the new value; a value the
        command line did not give (a recipe's or a default that changed since) takes the run's value back;
        a value given on the command line that would train another run is refused, naming the flags that
        resume it. Every change is printed."""
        notes, refused = [], []
        for key, value in saved.items():
            new = self.cfg.get(key)
            if key in self.RESUMABLE or key in self.REMEDIES:
                if key not in ("resume", "dry_run", "out"):
                    notes.append(f"  {key}: {value!r} -> {new!r}" + (" (the steps after the checkpoint train with it)"
                                                                     if key in self.REMEDIES else ""))
            elif key not in self.given and key not in self.INPUTS:
                setattr(cfg, key, value)
                self.cfg[key] = value
                notes.append(f"  {key} = {value!r} kept from the run ({new!r} is today's recipe or default)")
            else:
                refused.append(_flag(key, value))
        if refused:
            raise ValueError(f"--resume: {out} was trained with other values; resume it with {' '.join(refused)}, "
                             "or choose another --out")
        if notes:
            print_main(self.dist, f"resuming {out} with:", *notes)

    def claim(self) -> None:
        """Take the run folder for this run, on every rank or none: rank 0 creates it if missing and holds
        an OS lock on out/.lock (flock) for the life of the process, so a killed run leaves no stale lock
        and a second process on the same folder fails here with one line naming the holder's PID. An
        unwritable --out (read-only, under a file) fails here too, before any model loads."""
        error = ""
        for stale in [r for r in _CLAIMED if r.path.resolve() == self.path.resolve()]:
            stale.release()  # a run of this process that ended without finish(): its folder is free again
        foreign = self.path.is_dir() and not (self.path / "config.json").exists() and \
            any(p.name != LOCK for p in self.path.iterdir())  # a folder of the user's: _check refuses it
        if self.dist.is_main and not foreign:
            try:
                self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
                self._fresh = not (self.path / "config.json").exists()  # this run starts the folder
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                error = (f"--out {self.path} cannot be created or written ({e.strerror or e}); choose a "
                         "folder you can write to")
                self._remove_created()
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    error = (f"--out {self.path} is in use by another run (PID {holder}); wait for it to end "
                             "or choose another --out")
                else:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    self._lock_fd = fd
                    _CLAIMED.append(self)
        if self.dist.world > 1:  # every rank stops if rank 0 could not claim the folder
            failed = self.dist.sum(torch.tensor([float(bool(error))], device=self.dist.device)).item() > 0
            error = error or ("rank 0 could not claim --out" if failed else "")
        if error:
            raise ValueError(error)

    def release(self, remove_if_unused: bool = False) -> None:
        """Let go of the run folder's lock (the end of the run, or a failure). remove_if_unused: after a
        failure or a stop before this run saved its first checkpoint, remove what it wrote (the folder and
        any parents it created, or, in a folder it found empty, its files), so that bad input leaves
        nothing behind and the same command starts again as printed."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self in _CLAIMED:
            _CLAIMED.remove(self)
        if remove_if_unused and self._fresh and not self.saved_step and self.path.is_dir() and \
                not (self.path / "checkpoint").exists():
            if self._created:
                self._remove_created()
            else:
                for p in self.path.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _remove_created(self) -> None:
        """Remove the folder and the parents that claim() created (deepest first)."""
        for p in self._created:
            shutil.rmtree(p, ignore_errors=True) if p == self.path else (p.rmdir() if p.is_dir() and
                                                                          not any(p.iterdir()) else None)

    def _find_checkpoint(self) -> None:
        """The newest complete checkpoint among the slots save() writes, or an error if only damaged
        ones exist (none at all: the run restarts from step 0)."""
        found, problems = {}, []
        for slot in self.SLOTS:
            if (self.path / slot).is_dir():
                step, why = read_manifest(self.path / slot)
                if step is None:
                    problems.append(why)
                else:
                    found[slot] = step
        if found:
            best = max(found, key=lambda s: (found[s], s == "checkpoint"))
            self.resume_from, self.start = self.path / best, found[best]
        elif (self.path / "checkpoint").is_dir():
            raise ValueError(f"{self.path} has no complete checkpoint to resume ({'; '.join(problems)}): "
                             f"restore {self.path}/checkpoint from a copy, or start over with another --out")

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    def create(self) -> None:
        """Write the run directory (rank 0): config.json, samples/; on resume, the newest complete
        checkpoint moved to checkpoint/ (never deleted), incomplete or older ones removed, and the
        metrics of steps past it dropped."""
        self.dist.barrier()
        if self.dist.is_main:
            (self.path / "samples").mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / "config.json", json.dumps(self.cfg, indent=2))
            if self.resume_from is not None and self.resume_from != self.checkpoint:
                if self.checkpoint.is_dir():  # older, or damaged: kept aside, not deleted
                    shutil.rmtree(self.path / "checkpoint.damaged", ignore_errors=True)
                    os.replace(self.checkpoint, self.path / "checkpoint.damaged")
                os.replace(self.resume_from, self.checkpoint)
                self.resume_from = self.checkpoint
            for slot in ("checkpoint.tmp", "checkpoint.old"):
                shutil.rmtree(self.path / slot, ignore_errors=True)
            metrics = self.path / "metrics.jsonl"
            if metrics.exists():  # the steps past the checkpoint go; a kill at any moment keeps every line
                kept = [r for r in read_jsonl(metrics, "the run's metrics", torn_tail_ok=True)
                        if r.get("step", -1) < self.start]
                write_atomic(metrics, "".join(json.dumps(r) + "\n" for r in kept))
        self.resume_from = self.checkpoint if self.start > 0 else None
        self.trackers = Trackers(parse_report_to(self.cfg.get("report_to", "none")), self.path, self.cfg,
                                 self.start, self.dist.is_main)
        self.dist.barrier()

    def log(self, metrics: dict, images: dict[str, str] | None = None) -> None:
        """One JSONL line (the ground truth), mirrored with the step's sample grids to the trackers."""
        if any(k.startswith("eval/") for k in metrics):
            self.last_eval = metrics
        if self.dist.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            self.trackers.log(metrics, images)

    def save(self, step: int, model, optimizer, ema, extra_config: dict, state: dict,
             tensors: dict[str, list[torch.Tensor]]) -> None:
        """checkpoint/: the EMA student as a PEFT folder (the copy to use), plus the raw weights, EMA
        shadow, optimizer state and any other `tensors` (e.g. NFT's old policy) needed to resume;
        written to checkpoint.tmp/, sealed by its manifest, then moved into place (publish_dir).
        Safe against a kill at any instant."""
        if self.dist.is_main:
            tmp = self.path / "checkpoint.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            ema.swap()
            try:
                model.save_student(tmp, {**extra_config, "step": step})
            finally:
                ema.swap()
            save_file({f"p{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.params)},
                      tmp / "raw_weights.safetensors")
            save_file({f"p{i}": s.contiguous().cpu() for i, s in enumerate(ema.shadow)},
                      tmp / "ema_weights.safetensors")
            for name, values in tensors.items():
                save_file({f"p{i}": v.detach().contiguous().cpu() for i, v in enumerate(values)},
                          tmp / f"{name}_weights.safetensors")
            model_card(tmp, self.cfg, json.loads((tmp / "run_config.json").read_text()), self.last_eval,
                       self.command, self.script)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), **state}, tmp / "trainer_state.pt")
            write_manifest(tmp, step)
            publish_dir(tmp, self.checkpoint)
        self.saved_step = step
        self.dist.barrier()

    def load(self, optimizer, ema, tensors: dict[str, list[torch.Tensor]]) -> dict:
        """Restore raw weights, EMA shadow, optimizer state and `tensors` from checkpoint/ (for
        --resume); returns the trainer state saved with them."""
        raw = load_file(self.checkpoint / "raw_weights.safetensors")
        shadow = load_file(self.checkpoint / "ema_weights.safetensors")
        with torch.no_grad():
            for i, (p, s) in enumerate(zip(ema.params, ema.shadow)):
                p.copy_(raw[f"p{i}"])
                s.copy_(shadow[f"p{i}"])
            for name, values in tensors.items():
                saved = load_file(self.checkpoint / f"{name}_weights.safetensors")
                for i, v in enumerate(values):
                    v.copy_(saved[f"p{i}"])
        state = torch.load(self.checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state.pop("optimizer"))
        return state
