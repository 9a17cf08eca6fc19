"""Install mplug-kernels; the CUDA extension mplug_kernels._C is built with CMake wherever nvcc exists.

Environment: CUDA_HOME (else nvcc on PATH) picks nvcc; MPLUG_KERNELS_CUDA_ARCHS (default "80;90",
PTX for the newest); MAX_JOBS (parallel compile jobs); MPLUG_KERNELS_SKIP_CUDA_BUILD=1 skips it.
The CMake build folder is build/cmake-<hash of nvcc, archs, Python> in the source tree and is kept between
installs, so a second ``pip install -e .`` recompiles only the changed sources (ccache is used when present).
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90"


def find_nvcc():
    """(path of nvcc, None) from CUDA_HOME then PATH, or (None, why it was not found)."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidate = Path(cuda_home) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate), None
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path, None
    return None, f"nvcc not found (CUDA_HOME={cuda_home or 'unset'}, and no nvcc on PATH)"


def cuda_build_disabled_reason():
    """Why the CUDA extension is not built, or None when it is."""
    if os.environ.get("MPLUG_KERNELS_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "MPLUG_KERNELS_SKIP_CUDA_BUILD is set"
    return find_nvcc()[1]


def find_tool(name):
    """A build tool from PATH or from its PyPI package (cmake, ninja); None when absent."""
    on_path = shutil.which(name)
    if on_path:
        return on_path
    if importlib.util.find_spec(name) is None:
        return None
    module = __import__(name)
    binary = Path(getattr(module, "BIN_DIR", getattr(module, "CMAKE_BIN_DIR", ""))) / name
    return str(binary) if binary.is_file() else None


def pybind11_include():
    """pybind11's header directory: the pybind11 package, else the copy shipped inside torch."""
    if importlib.util.find_spec("pybind11") is not None:
        import pybind11

        return pybind11.get_include()
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is not None and torch_spec.origin:
        bundled = Path(torch_spec.origin).parent / "include"
        if (bundled / "pybind11" / "pybind11.h").is_file():
            return str(bundled)
    raise RuntimeError("mplug-kernels: building the CUDA extension needs pybind11 (pip install pybind11)")


def cmake_build_dir(nvcc, archs, generator):
    """The persistent build folder for one (nvcc, archs, generator, Python): build/cmake-<12 hex digits>."""
    key = "\n".join([str(Path(nvcc).resolve()), archs, generator, sys.executable, sysconfig.get_config_var("EXT_SUFFIX")])
    return ROOT / "build" / f"cmake-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def stable_pybind11_include(build_dir):
    """pybind11's headers copied into build_dir once per pybind11 version: pip's build isolation puts them in a new
    temporary folder every install, and a changed include path would make ninja recompile every source."""
    source = Path(pybind11_include())
    try:
        from importlib.metadata import version

        stamp_text = f"pybind11 {version('pybind11')}"
    except Exception:  # pybind11 bundled with torch: no distribution metadata of its own
        stamp_text = f"headers from {source}"
    target = build_dir / "pybind11-include"
    stamp = target / "SOURCE"
    if not stamp.is_file() or stamp.read_text() != stamp_text:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source / "pybind11", target / "pybind11")
        stamp.write_text(stamp_text)
    return target


def compiler_launchers():
    """CMake flags that put ccache in front of nvcc and the C++ compiler, when ccache is on PATH."""
    ccache = shutil.which("ccache")
    if ccache is None:
        return []
    return [f"-DCMAKE_CUDA_COMPILER_LAUNCHER={ccache}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={ccache}"]


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds CMakeExtensions with CMake + nvcc; drops them with one printed line when nvcc is missing."""

    def finalize_options(self):
        super().finalize_options()
        self.cuda_off_reason = cuda_build_disabled_reason()
        if self.cuda_off_reason:
            self.extensions = []

    def run(self):
        if self.cuda_off_reason:
            print(f"mplug-kernels: CUDA backend off ({self.cuda_off_reason}); installing the Triton and PyTorch "
                  "backends only", file=sys.stderr)
        super().run()

    def build_extension(self, ext):
        cmake = find_tool("cmake")
        if cmake is None:
            raise RuntimeError("mplug-kernels: nvcc was found but cmake was not (pip install cmake)")
        nvcc = find_nvcc()[0]
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        archs = os.environ.get("MPLUG_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).replace(",", ";")
        ninja = find_tool("ninja")
        build_dir = cmake_build_dir(nvcc, archs, "ninja" if ninja else "default")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            *(["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYBIND11_INCLUDE_DIR={stable_pybind11_include(build_dir)}",
            f"-DMPLUG_KERNELS_CUDA_ARCHS={archs}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            *compiler_launchers(),
        ]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        reused = ("reusing build folder {}: only changed sources recompile" if (build_dir / "CMakeCache.txt").is_file()
                  else "new build folder {}: a first build takes minutes")
        print(f"mplug-kernels: nvcc is compiling the CUDA extension ({nvcc}, sm {archs}, {jobs} jobs, "
              f"{reused.format(build_dir)})", file=sys.stderr, flush=True)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        built = output_dir / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
        if not built.is_file():
            raise RuntimeError(f"mplug-kernels: CMake finished but {built} is missing")


setup(
    name="mplug-kernels",
    version="0.1.0",
    description="Fused attention kernels and a model for the mPLUG vision-language architecture",
    packages=find_packages(include=["mplug_kernels*", "mplug*", "bench*"]),
    package_data={"mplug.run": ["configs/*.yaml"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy", "matplotlib", "tqdm", "transformers>=5.0",
                 "pyyaml", "pillow", "tokenizers", "pycocoevalcap"],
        # pycocoevalcap: the COCO caption metrics (its PTB tokenizer and METEOR need java on PATH).
        "train": ["pyyaml", "pillow", "tokenizers", "transformers>=5.0", "tqdm", "pycocoevalcap"],
        "video": ["av"],
        "bench": ["pytest-benchmark", "numpy", "matplotlib", "tqdm"],
        "hf": ["transformers>=5.0"],
    },
    entry_points={"console_scripts": ["mplug-bench = bench.__main__:main"]},
    ext_modules=[CMakeExtension("mplug_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
