"""Build of rlhf_fast's compiled kernels. Metadata lives in pyproject.toml.

Environment switches (all optional):
  RLHF_FAST_NO_EXTENSIONS=1    build no compiled code (pure Python: reference and Triton backends only)
  RLHF_FAST_CUDA=auto|1|0      CUDA extension: auto (when torch has CUDA and nvcc is found), force, or skip
  RLHF_FAST_CPU_ISA=auto|avx512|avx2|default
                               SIMD level of the C++ CPU kernels; auto probes the build machine
  MAX_JOBS, TORCH_CUDA_ARCH_LIST   honoured as in every torch.utils.cpp_extension build
"""

import glob
import os
import platform

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_args() -> list[str]:
    """Compiler flags selecting the at::vec implementation (ATen picks it by the CPU_CAPABILITY_* macros)."""
    isa = _env("RLHF_FAST_CPU_ISA", "auto")
    if isa == "auto":
        flags = _cpu_flags() if platform.machine() in ("x86_64", "AMD64") else set()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isa = "avx512"
        elif {"avx2", "fma", "f16c"} <= flags:
            isa = "avx2"
        else:
            isa = "default"
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
                "-DCPU_CAPABILITY=AVX512"]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if isa == "default":
        return ["-DCPU_CAPABILITY=DEFAULT"]
    raise ValueError(f"RLHF_FAST_CPU_ISA must be auto, avx512, avx2 or default, not {isa!r}")


def _want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = _env("RLHF_FAST_CUDA", "auto")
    if mode in ("0", "false", "no", "off"):
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("1", "true", "yes", "on"):
        if not have:
            raise RuntimeError("RLHF_FAST_CUDA=1 but torch has no CUDA build or nvcc (CUDA_HOME) was not found")
        return True
    return have


def _extensions():
    if _env("RLHF_FAST_NO_EXTENSIONS", "0") in ("1", "true", "yes", "on"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # -ffp-contract=off: the kernels compute z = x * (1 / T) in several places (a forward buffer, a label, the backward)
    # and rely on getting the same float each time; a compiler fusing one of them into an FMA breaks that (V = 1 gave
    # log-probs of 1e-4 instead of 0 at T = 1e-3). Explicit at::vec::fmadd calls are unaffected.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", *_isa_args()]
    exts = [
        CppExtension(
            "rlhf_fast._C",
            sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/bindings/cpu_*.cpp")),
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _want_cuda():
        exts.append(
            CUDAExtension(
                "rlhf_fast._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/bindings/cuda_*.cpp")),
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            )
        )
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
