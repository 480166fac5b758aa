"""Builds the C kernels (the LoRA add ``lora_runs.c``, paged decode attention ``paged_decode.c``) once per machine
and loads them with ctypes.

The kernel is compiled for the CPU it runs on (``-march=native``), so it is built on first use rather than shipped:
a few seconds with the system C compiler, cached under ``<cache dir>/kernels/`` by a key of the source, the
compiler, the flags and the CPU's feature flags (a cache volume moved to a different CPU gets a new build instead
of an illegal instruction). The build writes to a temporary file and renames it into place, so concurrent
builders never load a half-written library.

Threads: built with OpenMP and linked against the ``libgomp`` that ships inside torch, the kernel shares torch's
own thread pool (two OpenMP runtimes in one process would each keep spinning threads). Where that library is not
there, or the compiler lacks OpenMP or ``-march=native``, the next flag set down is tried; the last one is plain
``-O3``. No compiler at all raises ``NativeBuildError``, and the caller falls back to the torch op.

``build``/``load_source`` compile any one-file C source this way; ``shared_library`` is the LoRA kernel,
``shared_bf16_library`` its bfloat16 twin (``lora_runs_bf16.c``, whose AVX512-BF16 path the same ``-march=native``
turns on where the CPU has it).
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.paths import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "lora_runs.c"  # the LoRA kernel, the default source
BF16_SOURCE = Path(__file__).parent / "lora_runs_bf16.c"  # its bfloat16 twin (a library of its own)
BUILD_TIMEOUT_S = 120


class NativeBuildError(RuntimeError):
    """The kernel could not be compiled here (no compiler, or every flag set failed)."""


@dataclass(frozen=True)
class CompiledLibrary:
    """A loaded C source: the ctypes handle (declare each function's argtypes before calling it), and its build."""

    path: Path
    flags: tuple[str, ...]
    threaded: bool
    cdll: ctypes.CDLL


@dataclass(frozen=True)
class NativeLibrary:
    """The loaded kernel: ``lora_add_runs_f32`` with its ctypes signature set, and how it was built."""

    path: Path
    flags: tuple[str, ...]
    threaded: bool
    lora_add_runs_f32: Callable[..., int]


@dataclass(frozen=True)
class NativeBf16Library:
    """The loaded bfloat16 kernel: ``lora_add_runs_bf16`` with its ctypes signature set, how it was built, and
    whether its shrink uses AVX512-BF16 dot products (the compiler's ``-march=native`` had ``__AVX512BF16__``)."""

    path: Path
    flags: tuple[str, ...]
    threaded: bool
    uses_dpbf16: bool
    lora_add_runs_bf16: Callable[..., int]


def _torch_lib_dir() -> Path | None:
    """torch's bundled ``lib`` folder when it holds the libgomp torch itself uses (Linux wheels), found without
    importing torch."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if (lib / "libgomp.so.1").is_file() else None


def flag_sets() -> list[tuple[tuple[str, ...], bool]]:
    """Compiler flag sets to try, best first, each with whether it gives a threaded kernel."""
    common = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas")
    sets: list[tuple[tuple[str, ...], bool]] = []
    if (torch_lib := _torch_lib_dir()) is not None:
        openmp = ("-fopenmp", f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}")
        sets.append(((*common, "-march=native", *openmp), True))
    sets.append(((*common, "-march=native"), False))
    sets.append((common, False))
    return sets


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("flags", "Features", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def find_compiler() -> str | None:
    """``$CC``, else the first of cc, gcc, clang on PATH."""
    if cc := os.environ.get("CC"):
        return shutil.which(cc)
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def build(
    cache_dir: str | os.PathLike[str] | None = None, source_path: Path = SOURCE
) -> tuple[Path, tuple[str, ...], bool]:
    """Path of the library built from ``source_path`` (building it unless cached), the flags it was built with, and
    whether it is threaded. Raises ``NativeBuildError`` when no flag set compiles."""
    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError("no C compiler found (set CC, or install gcc or clang)")
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"{compiler} --version failed: {exc}") from exc
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    source = source_path.read_bytes()
    stem = source_path.stem
    errors: list[str] = []
    for flags, threaded in flag_sets():
        identity = "\0".join((compiler, *version, " ".join(flags), _cpu_signature())).encode()
        key = hashlib.sha256(source + b"\0" + identity).hexdigest()[:16]
        target = folder / f"{stem}-{key}.so"
        if target.is_file():
            return target, flags, threaded
        fd, partial = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            result = subprocess.run(
                [compiler, *flags, "-o", partial, str(source_path)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
            if result.returncode == 0:
                os.replace(partial, target)
                log.info("built the native kernel %s (%s)", target.name, " ".join(flags))
                return target, flags, threaded
            errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-500:]}")
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {exc}")
        finally:
            Path(partial).unlink(missing_ok=True)
    raise NativeBuildError(f"could not compile {source_path.name}:\n" + "\n".join(errors))


def load_source(source_path: Path, cache_dir: str | os.PathLike[str] | None = None) -> CompiledLibrary:
    """Build (or find) and load the library of one C source; raises ``NativeBuildError`` when it cannot."""
    path, flags, threaded = build(cache_dir, source_path)
    try:
        return CompiledLibrary(path, flags, threaded, ctypes.CDLL(str(path)))
    except OSError as exc:
        raise NativeBuildError(f"could not load {path}: {exc}") from exc


def load(cache_dir: str | os.PathLike[str] | None = None) -> NativeLibrary:
    """Build (or find) and load the LoRA kernel, with the C signature declared so ctypes converts the arguments."""
    compiled = load_source(SOURCE, cache_dir)
    path, flags, threaded = compiled.path, compiled.flags, compiled.threaded
    fn = compiled.cdll.lora_add_runs_f32
    declare_runs_signature(fn)
    return NativeLibrary(path, flags, threaded, fn)


def declare_runs_signature(fn: Any) -> None:  # a ctypes function pointer
    """The C signature both LoRA kernels share (the element type is behind the pointers)."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    # y, ldy, x, ldx, n_tokens, in, out, a, b, n_entries, n_rows, slot table, scales, runs, n_runs, num_threads
    fn.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, ctypes.c_int]
    fn.restype = ctypes.c_int


def load_bf16(cache_dir: str | os.PathLike[str] | None = None) -> NativeBf16Library:
    """Build (or find) and load the bfloat16 LoRA kernel."""
    compiled = load_source(BF16_SOURCE, cache_dir)
    fn = compiled.cdll.lora_add_runs_bf16
    declare_runs_signature(fn)
    uses_dpbf16 = bool(compiled.cdll.lora_bf16_uses_dpbf16())
    return NativeBf16Library(compiled.path, compiled.flags, compiled.threaded, uses_dpbf16, fn)


@functools.cache
def shared_library() -> NativeLibrary | None:
    """The process-wide kernel, built at most once; None (with the reason logged) where it cannot be built."""
    try:
        return load()
    except (NativeBuildError, OSError) as exc:  # OSError: e.g. a read-only cache folder
        log.warning("native LoRA kernel unavailable, using the torch op: %s", exc)
        return None


@functools.cache
def shared_bf16_library() -> NativeBf16Library | None:
    """The process-wide bfloat16 kernel, built at most once; None (with the reason logged) where it cannot be."""
    try:
        library = load_bf16()
    except (NativeBuildError, OSError) as exc:
        log.warning("native bfloat16 LoRA kernel unavailable, using the torch op: %s", exc)
        return None
    how = "AVX512-BF16 dot products" if library.uses_dpbf16 else "bfloat16 widened to float32 (no AVX512-BF16 here)"
    log.info("native bfloat16 LoRA kernel: %s", how)
    return library
