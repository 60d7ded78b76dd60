"""Builds the one extension, sparsekern._C.

csrc/cpu/*.cpp always (OpenMP via torch's thread pool, -O3, per-ISA micro-kernels chosen at run
time); csrc/cuda/*.cu when a CUDA toolkit and a CUDA build of torch are present, or FORCE_CUDA=1.
SPARSEKERN_CPU_ONLY=1 forces a CPU-only build. MAX_JOBS is honoured by torch's ninja build.
"""
import glob
import os
import shutil

from setuptools import setup


def find_cuda_home():
    """The toolkit folder whose lib64 holds libcudart.so (torch's guess from PATH can be wrong:
    the nvcc on PATH may be a wrapper script outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for word in head.split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates += ["/opt/cuda"]
    for home in candidates:
        if not home:
            continue
        has_rt = any(os.path.exists(os.path.join(home, d, "libcudart.so"))
                     for d in ("lib64", "lib", "targets/x86_64-linux/lib"))
        if has_rt and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


CPU_ONLY = os.environ.get("SPARSEKERN_CPU_ONLY", "0") == "1"
CUDA_HOME = None if CPU_ONLY else find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = not CPU_ONLY and (
    os.environ.get("FORCE_CUDA", "0") == "1"
    or (CUDA_HOME is not None and torch.version.cuda is not None)
)

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# -fopenmp is required: at::parallel_for is an inline OpenMP template compiled into this library.
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
link_flags = ["-fopenmp"]
define_macros = []
if WITH_CUDA:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to detect the architecture from: build for A100 and H100 (+PTX for newer).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("SPARSEKERN_WITH_CUDA", None))
    ext = CUDAExtension(
        "sparsekern._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("sparsekern._C", sources, define_macros=define_macros,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
