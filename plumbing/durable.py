"""Files that survive a kill at any instant: a checkpoint folder sealed by a manifest (the size and SHA-256
of every file, written last), a file replaced atomically, a folder published by renames. Departure 4 of
student.py rests on these; plumbing/rundir.py writes its checkpoints with them.

Run: a library.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANIFEST = "checkpoint.json"


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's) bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """Seal a fully written checkpoint folder: every file fsynced, then checkpoint.json (step, size and
    SHA-256 of each file) written to a temporary name and renamed into place, last."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        fsync(p)
    manifest = {"step": step, "files": {p.relative_to(folder).as_posix():
                                        {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    fsync(tmp)
    os.replace(tmp, folder / MANIFEST)
    fsync(folder)


def read_manifest(folder: Path) -> tuple[int | None, str]:
    """(step, "") for a complete checkpoint whose files all match its manifest; (None, why) if not."""
    if not (folder / MANIFEST).is_file():
        return None, f"{folder.name}/ has no {MANIFEST} (its writing was interrupted)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{folder.name}/{MANIFEST} is not valid JSON"
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) and "step" in manifest):
        return None, f"{folder.name}/{MANIFEST} lacks its 'files' or 'step' entry"
    for name, want in manifest["files"].items():
        p = folder / name
        if not p.is_file():
            return None, f"{folder.name}/{name} is missing"
        if p.stat().st_size != want["bytes"]:
            return None, (f"{folder.name}/{name} has {p.stat().st_size} bytes where its manifest says "
                          f"{want['bytes']}")
        if sha256(p) != want["sha256"]:
            return None, f"{folder.name}/{name} does not match its SHA-256 in {MANIFEST}"
    return manifest["step"], ""


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` such that a kill at any instant leaves the old file or the new one:
    written to path.tmp, fsynced, renamed over path."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder `tmp` to `final`: final -> final.old, tmp -> final, remove old.
    A kill between the two renames leaves tmp and old complete; RunDir.create recovers from that."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)
