"""Build the compiled extension ``fastseq._C`` from ``csrc/``.

The C++ CPU sources are always built. The CUDA sources are added when torch has CUDA and an
``nvcc`` is found; ``FASTSEQ_CUDA=1`` forces them on (failing loudly if they cannot build) and
``FASTSEQ_CUDA=0`` forces them off.

``kernels/`` (Triton) and ``benchmarks/`` (the benchmark suites) are installed as ``fastseq.kernels``
and ``fastseq.benchmarks`` through the links ``fastseq/kernels`` and ``fastseq/benchmarks``. Neither
folder has an ``__init__.py``: a regular package named ``kernels`` at the repository root would
shadow any installed package of that name (transformers imports one) whenever the root is on
``sys.path``, while a folder without one never takes precedence over an installed package.
"""

import glob
import os
import shutil
import sysconfig

from setuptools import setup


def _has_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def _locate_cuda_home():
    """Return the CUDA toolkit folder, seeing through an ``nvcc`` that is a link or a wrapper."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _has_toolkit(c)), None)


def _want_cuda(torch_has_cuda, cuda_home):
    forced = os.environ.get("FASTSEQ_CUDA", "").strip()
    if forced in ("0", "1"):
        if forced == "1" and not (torch_has_cuda and cuda_home):
            raise RuntimeError("FASTSEQ_CUDA=1 but torch has no CUDA or no CUDA toolkit was found")
        return forced == "1"
    return torch_has_cuda and cuda_home is not None


def _extra_cuda_includes():
    """Headers shipped by the nvidia-* wheels torch depends on (e.g. cuBLAS, cuRAND)."""
    site = sysconfig.get_paths()["purelib"]
    return [p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p)]


def _extensions():
    cuda_home = _locate_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import
    import torch
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch.version.cuda is not None, cuda_home)
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch adds (C++20 for torch 2.14)
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx.append("-DFASTSEQ_WITH_CUDA")
        extra["nvcc"] = ["-O3", "--use_fast_math", "-DFASTSEQ_WITH_CUDA"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension
        include_dirs = _extra_cuda_includes()
    else:
        ext = cpp_extension.CppExtension
        include_dirs = []
    return [
        ext(
            "fastseq._C",
            sources,
            include_dirs=[os.path.abspath("csrc")] + include_dirs,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()

setup(
    packages=[
        "fastseq",
        "fastseq.ops",
        "fastseq.reference",
        "fastseq.nn",
        "fastseq.profiling",
        "fastseq.integrations",
        "fastseq.bench",
        "fastseq.kernels",
        "fastseq.benchmarks",
    ],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
