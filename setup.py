"""Install mplug-kernels; the CUDA extension mplug_kernels._C is built where nvcc exists."""
from setuptools import find_packages, setup

setup(
    name="mplug-kernels",
    version="0.1.0",
    description="Fused attention kernels and a model for the mPLUG vision-language architecture",
    packages=find_packages(include=["mplug_kernels*", "mplug*", "bench*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
    },
)
