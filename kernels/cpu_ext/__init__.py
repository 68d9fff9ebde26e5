"""braid's CPU kernels in C++ (a torch extension): paged decode attention (fp32), the
KV cache write, the LSE merge, linear layers on 16-row weight panels (fp32,
AVX-512; gemm.cpp), and the flags of the shared-memory collectives.

Built ahead of time (`scripts/setup.sh` runs `python -m braid.kernels.cpu_ext`,
needs a C++ compiler and ninja) into a folder named by a digest of the source,
the torch version and the flags, under $BRAID_EXT_DIR (default
~/.cache/braid/ext). At run time `load()` only imports a build that is already
there: a rank never compiles in the middle of serving. Without one (or with
BRAID_CPU_EXT=0) braid.kernels.ops uses the torch implementation (`batched`),
same contract, and says so once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time

import torch

log = logging.getLogger(__name__)

NAME = "braid_cpu_ext"
_SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
            for name in ("paged_decode.cpp", "shm_sync.cpp", "gemm.cpp")]
_loaded: list = []  # [module or None] once tried


def _flags() -> list[str]:
    """-O3, OpenMP (at::parallel_for is OpenMP pragmas inlined from torch's headers: without
    -fopenmp every kernel ran on one thread whatever torch.set_num_threads said; the
    runtime is the libgomp torch already loaded), and AVX2/FMA code where the building CPU
    has them (the build runs where it serves)."""
    flags = ["-O3", "-fopenmp"]
    try:
        with open("/proc/cpuinfo") as f:
            cpu = f.read()
    except OSError:
        cpu = ""
    if " avx2" in cpu and " fma" in cpu:
        flags.append("-march=x86-64-v3")
    return flags


def build_dir() -> str:
    h = hashlib.sha256()
    for src in _SOURCES:
        with open(src, "rb") as f:
            h.update(f.read())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{_flags()}".encode())
    base = os.environ.get("BRAID_EXT_DIR", os.path.expanduser("~/.cache/braid/ext"))
    return os.path.join(base, h.hexdigest()[:16])


def _library(folder: str) -> str | None:
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        if name.startswith(NAME) and name.endswith(".so"):
            return os.path.join(folder, name)
    return None


def build():
    """Compile (or find up to date) and import the extension."""
    from torch.utils.cpp_extension import load as jit_load

    folder = build_dir()
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, "lock")  # torch's build baton: one a killed build left would be waited on forever
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 600:
        os.remove(lock)
    return jit_load(name=NAME, sources=_SOURCES, build_directory=folder, extra_cflags=_flags(),
                    extra_ldflags=["-fopenmp"], verbose=False)


def load():
    """The built extension module, or None (not built here, disabled, or not loadable)."""
    if _loaded:
        return _loaded[0]
    module = None
    if os.environ.get("BRAID_CPU_EXT", "1") != "0":
        path = _library(build_dir())
        if path is None:
            log.info("braid CPU kernels not built (python -m braid.kernels.cpu_ext); using torch ops")
        else:
            try:
                spec = importlib.util.spec_from_file_location(NAME, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except (ImportError, OSError) as e:
                log.warning("braid CPU kernels at %s do not load (%s); using torch ops", path, e)
                module = None
    _loaded.append(module)
    return module
