"""Build script: the package itself is declared in pyproject.toml; this file only adds the
optional C++/CUDA extension ``kdbench._C`` (see csrc/).

- The CPU sources are always built (torch.utils.cpp_extension + ninja).
- The CUDA sources are added whenever nvcc and a CUDA build of torch are present, even
  without a visible GPU (then ``TORCH_CUDA_ARCH_LIST`` defaults to a short list), so a
  compile error in them is caught on any machine with the toolkit.
- ``KDBENCH_NO_CUDA=1`` skips the CUDA sources; ``KDBENCH_NO_EXTENSION=1`` skips the whole
  extension. If the build fails (no compiler, no torch headers), the package still installs
  and ``kdbench.kernels`` uses its pure-PyTorch fallback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
CPU_SOURCES = [
    "ops.cpp",
    "kd_cpu.cpp",
    "kd_cpu_default.cpp",
    "kd_cpu_avx2.cpp",
    "kd_cpu_avx512.cpp",
    "cka.cpp",
    "gram_avx2.cpp",
    "gram_avx512.cpp",
]
CUDA_SOURCES = ["kd_cuda.cu"]
# Targets when no GPU is visible: Ampere and Hopper, as PTX-embedding cubins (kept short so
# a clean build stays quick; set TORCH_CUDA_ARCH_LIST to override).
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _warn(msg: str) -> None:
    print(f"kdbench setup: {msg}", file=sys.stderr)


def _default_cuda_home() -> None:
    """Points torch at the toolkit in /usr/local/cuda when nothing else says where it is
    (torch would otherwise derive it from an nvcc wrapper on PATH, e.g. /usr/local)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").exists() and (default / "include" / "cuda_runtime.h").exists():
        os.environ["CUDA_HOME"] = str(default)


def _want_cuda() -> bool:
    if os.environ.get("KDBENCH_NO_CUDA"):
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 - torch without the extension tooling
        return False
    return (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and (Path(CUDA_HOME) / "bin" / "nvcc").exists()
    )


def _extension_kwargs() -> dict:
    if os.environ.get("KDBENCH_NO_EXTENSION"):
        return {}
    _default_cuda_home()
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 - no torch at build time: pure-Python install
        _warn(f"torch.utils.cpp_extension unavailable ({exc}); installing without kdbench._C")
        return {}

    # -fopenmp: at::parallel_for is a header template; without it the pragma is dropped and
    # every "parallel" loop of ours runs on one thread (the runtime is torch's own libgomp)
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    link_flags = ["-fopenmp"]
    cpu_sources = [f"{CSRC}/{name}" for name in CPU_SOURCES]

    def cpu_extension():
        return CppExtension(
            "kdbench._C", cpu_sources, extra_compile_args={"cxx": list(cxx_flags)}, extra_link_args=link_flags
        )

    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        ext = CUDAExtension(
            "kdbench._C",
            cpu_sources + [f"{CSRC}/{name}" for name in CUDA_SOURCES],
            extra_compile_args={
                "cxx": cxx_flags + ["-DKDBENCH_WITH_CUDA"],
                "nvcc": ["-O3", "-DKDBENCH_WITH_CUDA"],
            },
            extra_link_args=link_flags,
        )
    else:
        ext = cpu_extension()

    class OptionalBuildExtension(BuildExtension):
        """Builds kdbench._C; if the CUDA build fails, retries CPU-only; if that fails too,
        only warns: the package installs and uses its pure-PyTorch fallback."""

        def run(self) -> None:
            try:
                super().run()
                return
            except Exception as exc:  # noqa: BLE001 - any compiler/toolkit failure
                _warn(f"building kdbench._C failed ({exc})")
            if any(src.endswith(".cu") for src in self.extensions[0].sources):
                _warn("retrying without the CUDA sources")
                self.extensions = [cpu_extension()]
                try:
                    super().run()
                    return
                except Exception as exc:  # noqa: BLE001
                    _warn(f"building kdbench._C (CPU only) failed ({exc})")
            _warn("kdbench.kernels will use the pure-PyTorch fallback")

    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
    }


setup(**_extension_kwargs())
