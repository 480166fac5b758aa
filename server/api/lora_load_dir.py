"""The PEFT folder that vLLM's ``POST /v1/load_lora_adapter`` names by path, opened only under ``--lora-load-dir``.

The operator allows one folder; a client (holding the admin key) may name any folder below it, and nothing else:

* ``lora_path`` must be absolute, without a ``..`` component, and lexically inside the allowed folder, as configured
  or as it resolves (the configured path itself may go through symbolic links: the operator chose it);
* every component below the allowed folder is opened relative to its parent, without following a symbolic link
  (``O_NOFOLLOW``), and so are the two PEFT files inside: a symbolic link anywhere below the allowed folder is
  refused, and one swapped in between the check and the read fails the open instead of being followed. Nothing is
  ever resolved by name, so nothing outside the allowed folder is looked at;
* the last component must be a directory, and ``adapter_config.json`` and ``adapter_model.safetensors`` regular
  files (opened non-blocking, so a FIFO put there cannot hang the reader).

Hard links are not told apart from files: whoever can write into the allowed folder decides what it holds, so it
should be writable by the operator only.
"""

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from server.adapters.archive import CONFIG_FILE, WEIGHTS_FILE
from server.api.errors import ApiError

FLAG = "--lora-load-dir"
ENV = "LORA_SERVER_LORA_LOAD_DIR"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_SHOWN = 200  # characters of a client's path quoted back in a message


def disabled() -> ApiError:
    return ApiError(403, "forbidden", f"loading adapters from a path is disabled on this server: the operator enables "
                    f"it with {FLAG} DIR (or {ENV}), naming the folder adapters may be loaded from")  # fmt: skip


def _shown(path: str) -> str:
    return repr(path if len(path) <= _SHOWN else path[:_SHOWN] + "...")


def _outside(lora_path: str, why: str) -> ApiError:
    return ApiError(403, "forbidden", f"lora_path {_shown(lora_path)} is refused: {why}")


def relative_parts(allowed: Path, lora_path: str) -> tuple[str, ...]:
    """The components of ``lora_path`` below ``allowed`` (``()`` for the folder itself), decided from the text alone;
    ApiError (400 or 403) for a path that is relative, holds ``..`` or a NUL byte, or is not inside ``allowed``."""
    if "\x00" in lora_path:
        raise ApiError(400, "invalid_request", "lora_path contains a NUL byte")
    if not PurePosixPath(lora_path).is_absolute():
        raise ApiError(400, "invalid_request", f"lora_path {_shown(lora_path)} must be an absolute path to a folder "
                       f"under the server's {FLAG} (repository ids are not downloaded)")  # fmt: skip
    parts = tuple(part for part in lora_path.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _outside(lora_path, "it contains '..'")
    for root in dict.fromkeys((Path(os.path.abspath(allowed)), Path(os.path.realpath(allowed)))):
        inside = root.parts[1:]  # without the leading "/"
        if parts[: len(inside)] == inside:
            return parts[len(inside) :]
    raise _outside(lora_path, f"it is not under {str(allowed)!r}, the folder this server loads adapters from ({FLAG})")


def _lstat_below(parent: int, name: str, lora_path: str) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        raise ApiError(404, "not_found", f"lora_path {_shown(lora_path)} does not exist") from None
    except PermissionError:
        raise ApiError(403, "forbidden", f"the server may not read lora_path {_shown(lora_path)}") from None


def _open_below(parent: int, name: str, flags: int, lora_path: str) -> int:
    """``name`` in the folder ``parent`` opened without following a link; a change since it was checked refuses."""
    try:
        return os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EACCES, errno.EPERM):
            raise _outside(lora_path, f"{name!r} changed while it was being opened, or cannot be read") from None
        raise


def _open_dir_below(parent: int, name: str, lora_path: str) -> int:
    mode = _lstat_below(parent, name, lora_path).st_mode
    if stat.S_ISLNK(mode):
        raise _outside(lora_path, f"{name!r} is a symbolic link")
    if not stat.S_ISDIR(mode):
        raise ApiError(400, "invalid_request", f"lora_path {_shown(lora_path)} is not a directory")
    return _open_below(parent, name, _DIR_FLAGS, lora_path)


def _open_file_in(folder: int, name: str, lora_path: str) -> BinaryIO:
    try:
        mode = _lstat_below(folder, name, lora_path).st_mode
    except ApiError as exc:
        if exc.status != 404:
            raise
        raise ApiError(422, "invalid_adapter", f"lora_path {_shown(lora_path)} holds no {name}") from None
    if stat.S_ISLNK(mode):
        raise _outside(lora_path, f"its {name} is a symbolic link")
    fd = _open_below(folder, name, _FILE_FLAGS, lora_path)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ApiError(422, "invalid_adapter", f"{name} in lora_path {_shown(lora_path)} is not a regular file")
    return os.fdopen(fd, "rb")


@contextmanager
def open_adapter_files(allowed: Path, lora_path: str) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(adapter_config.json, adapter_model.safetensors) of the PEFT folder ``lora_path``, open for reading, when it
    lies under ``allowed`` without a symbolic link (see the module docstring); closed on exit. Raises ApiError:
    400 (relative, not a directory), 403 (outside, '..', a symbolic link, unreadable), 404 (missing), 422 (a PEFT
    file missing or not a regular file)."""
    parts = relative_parts(allowed, lora_path)
    with ExitStack() as stack:
        try:  # the operator's path: links in it are followed
            folder = os.open(allowed, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            why = f"the server's {FLAG} folder cannot be opened ({exc.strerror})"
            raise ApiError(503, "unavailable", why) from None
        stack.callback(os.close, folder)
        for part in parts:
            folder = _open_dir_below(folder, part, lora_path)
            stack.callback(os.close, folder)
        config = stack.enter_context(_open_file_in(folder, CONFIG_FILE, lora_path))
        weights = stack.enter_context(_open_file_in(folder, WEIGHTS_FILE, lora_path))
        yield config, weights
