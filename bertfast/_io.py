"""All-or-nothing writes: every file and folder the project writes goes through here.

A file is written to a temporary beside its target (a unique name, so two processes writing the
same target never share one) and renamed over it; a folder is built beside its target and swapped
in. Whatever fails on the way (a full disk, a serializer's error, an interrupt) removes the
temporary output, leaves the previous target as it was, and raises one error that names the path
(`WriteError`, an OSError; "no space left on device" when that is the cause).

    write_text(path, text)          write_json(path, obj)        write_bytes(path, data)
    save_torch(obj, path)           save_safetensors(tensors, path, metadata)
    save_numpy(path, array)
    with atomic_file(path) as tmp: ...      # any writer that takes a path
    with atomic_folder(folder) as tmp: ...  # a whole folder, swapped in on success
    recover_folder(folder)                  # undo a swap a crash cut in half (loaders call it)

This module imports nothing of bertfast, so every layer may use it.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import stat
import tempfile
import warnings
from typing import Iterable, Iterator, Optional

__all__ = ["WriteError", "atomic_file", "atomic_folder", "recover_folder", "write_text", "write_bytes",
           "write_json", "save_torch", "save_safetensors", "save_numpy", "json_safe", "is_no_space", "OLD_MARK", "TMP_MARK"]

TMP_MARK = ".tmp-"   # in the names of temporaries being written: `.NAME.tmp-XXXXXXXX`
OLD_MARK = ".old-"   # a folder's previous version, renamed aside during a swap: `.NAME.old-XXXXXXXX`


class WriteError(OSError):
    """Writing `.path` failed; nothing was left behind and the previous version (if any) is intact."""

    path = ""


def is_no_space(exc: BaseException) -> bool:
    """torch.save and safetensors wrap the OS error in their own (RuntimeError "unexpected pos",
    SafetensorError), so the cause is also looked for in the chain and the message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc).lower()
        if "no space left" in text or "enospc" in text or "errno 28" in text or "os error 28" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _write_error(path: str, exc: BaseException) -> WriteError:
    inner = ""
    if isinstance(exc, WriteError):  # a file of a folder being written: name the folder, then the file
        inner = f" (while writing {os.path.basename(exc.path)})"
        exc = exc.__cause__ or exc
    if is_no_space(exc):
        err = WriteError(errno.ENOSPC, f"could not write {path}: no space left on device{inner}; nothing was "
                                       f"written and the previous version, if any, is intact")
    else:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        err = WriteError(code, f"could not write {path}{inner}: {type(exc).__name__}: {detail}; nothing was "
                               f"written and the previous version, if any, is intact")
    err.path = path
    return err


def _umask() -> int:
    try:  # read without changing it (os.umask can only be read by setting it, racing other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_mode(tmp: str, target: str, default: int) -> None:
    """mkstemp/mkdtemp make owner-only temporaries: give the output the mode the target had, else
    the one a plain open/mkdir would have given it (default minus the umask)."""
    try:
        mode = os.stat(target).st_mode & 0o7777
    except OSError:
        mode = default & ~_umask()
    os.chmod(tmp, mode)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a fresh temporary path beside `path` (ending in `suffix`, for writers that insist on an
    extension, e.g. numpy's ".npy"); on a clean exit it replaces `path` in one rename. Any exception
    removes the temporary and becomes a WriteError naming `path` (KeyboardInterrupt too removes it,
    and passes through as it is)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TMP_MARK}", suffix=suffix, dir=parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        yield tmp
        _set_mode(tmp, path, 0o666)  # after the writer: some (safetensors) replace the file they are given
        os.replace(tmp, path)
    except WriteError:
        _remove(tmp)
        raise
    except Exception as e:  # noqa: BLE001 - whatever the writer raised, the caller gets the path and the cause
        _remove(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise


def _open_binary(path: str):
    """The file object every Python-side writer here writes through (tests replace it with one
    that fails part-way, as a full disk does)."""
    return open(path, "wb")


def _finish(f) -> None:
    f.flush()
    with contextlib.suppress(OSError, AttributeError, ValueError):  # not every file object has a descriptor
        os.fsync(f.fileno())


def write_bytes(path: str, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with _open_binary(tmp) as f:
            f.write(data)
            _finish(f)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_safe(obj):
    """`obj` with every non-finite float (NaN, inf) replaced by None: JSON has no NaN, and a reader
    that follows the standard refuses Python's `NaN` token."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str, obj, indent: Optional[int] = 2, sort_keys: bool = False) -> None:
    """Standard JSON (no NaN: see json_safe), written all-or-nothing."""
    write_text(path, json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def save_torch(obj, path: str) -> None:
    import torch

    # through a Python file object: given a path, torch.save's own writer turns a full disk into
    # "unexpected pos" with no errno; through a file object the OSError stays in the chain
    with atomic_file(path) as tmp:
        with _open_binary(tmp) as f:
            torch.save(obj, f)
            _finish(f)


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save_numpy(path: str, array) -> None:
    import numpy as np

    with atomic_file(path, suffix=".npy") as tmp:
        with _open_binary(tmp) as f:
            np.save(f, array)
            _finish(f)


# ---- folders ----------------------------------------------------------------------------------


def _asides(folder: str) -> list:
    parent, name = os.path.split(os.path.abspath(folder))
    return sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}{OLD_MARK}*")),
                  key=os.path.getmtime, reverse=True)


def recover_folder(folder: str) -> None:
    """A crash between the two renames of a swap (see atomic_folder) leaves no `folder`, only its
    previous version renamed aside: put that back. Loaders call this before they read a folder."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder):
        return
    for old in _asides(folder):
        if not os.listdir(old):  # an empty placeholder of a swap that never moved anything aside
            continue
        with contextlib.suppress(OSError):
            os.rename(old, folder)
            warnings.warn(f"{folder}: a save was interrupted while swapping the new version in; the previous "
                          f"version was restored from {old}", stacklevel=3)
            return


def _link_tree(src: str, dst: str) -> None:
    """Hard-link (copy where links are refused) the file or folder `src` to `dst`."""
    if os.path.isdir(src) and not os.path.islink(src):
        os.makedirs(dst, exist_ok=True)
        for entry in os.listdir(src):
            _link_tree(os.path.join(src, entry), os.path.join(dst, entry))
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


@contextlib.contextmanager
def atomic_folder(folder: str, replaces: Iterable[str] = ()) -> Iterator[str]:
    """Yield an empty temporary folder beside `folder`; on a clean exit it becomes `folder`.

    Entries of the existing folder that the new one does not write (a tokenizer saved there before,
    checkpoints/, metrics.jsonl, a README) are carried over as hard links (copies where links are
    refused), except those named in `replaces` (stale files the new version supersedes). Then the
    old folder is renamed aside (`.NAME.old-XXXX`), the new one renamed in, and the old one removed.
    A crash between those two renames leaves no `folder` but its complete previous version aside:
    recover_folder (called by every loader) renames it back. A crash at any other point leaves the
    old or the new version in place, and at most a hidden temporary. Any failure while writing
    removes the temporary folder and raises a WriteError naming `folder`.
    """
    folder = os.path.abspath(os.fspath(folder))
    parent, name = os.path.split(folder)
    # no recover_folder here: while another writer is between its renames, the folder is briefly
    # absent by design, and putting its old version back would only make that writer retry
    # one stat, one observation: another writer may rename the folder away between two checks
    try:
        is_file = not stat.S_ISDIR(os.stat(folder).st_mode)
    except (FileNotFoundError, NotADirectoryError):  # absent (a parent that is a file fails below)
        is_file = False
    if is_file:
        raise _write_error(folder, NotADirectoryError(errno.ENOTDIR, "it exists and is not a folder"))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=parent)
        _set_mode(tmp, folder, 0o777)
    except OSError as e:
        raise _write_error(folder, e) from e
    try:
        yield tmp
        _carry_over(folder, tmp, set(replaces) | set(os.listdir(tmp)))
        _swap_in(tmp, folder)
    except Exception as e:  # noqa: BLE001 - see atomic_file
        _remove(tmp)
        raise _write_error(folder, e) from e
    except BaseException:
        _remove(tmp)
        raise


def _carry_over(folder: str, tmp: str, skip: set) -> None:
    """Link the entries of `folder` that are not in `skip` into `tmp`. Another writer may swap
    `folder` away meanwhile: what vanished is not carried (the last writer's version wins)."""
    try:
        entries = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry not in skip:
            try:
                _link_tree(os.path.join(folder, entry), os.path.join(tmp, entry))
            except FileNotFoundError:
                pass


def _swap_in(tmp: str, folder: str) -> None:
    parent, name = os.path.split(folder)
    for _ in range(20):  # another process may swap its own version in at the same moment: the last one wins
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=f".{name}{OLD_MARK}", dir=parent)
            try:
                os.replace(folder, old)  # the empty placeholder from mkdtemp is replaced
            except FileNotFoundError:  # the other writer moved it first
                os.rmdir(old)
                old = None
        try:
            os.rename(tmp, folder)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # the other writer renamed its version in between
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                continue
            if old is not None:
                os.rename(old, folder)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(errno.EBUSY, f"{folder} kept changing while swapping the new version in")


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB chunks (checkpoint manifests, shard records,
    model fingerprints)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
