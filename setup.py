from setuptools import find_packages, setup

setup(
    name="jaxstages",
    version="0.1.0",
    description="Train decoder LLMs through pretrain, mid-train, SFT, RL, DPO and distillation, in JAX; "
                "split a fixed compute budget across stages.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # the shipped configs go into the package as `jaxstages/configs` (jaxstages.config.CONFIGS_DIR), so an install
    # that is not editable loads them too; a checkout's own `configs/` is read first
    packages=find_packages(include=["jaxstages", "jaxstages.*"])
    + ["jaxstages.configs", "jaxstages.configs.pipelines", "jaxstages.configs.recipes"],
    package_dir={"jaxstages.configs": "configs"},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "sentencepiece>=0.2.3",
        "chex>=0.1.92",
        "ml-collections>=1.1.0",
        "numpy",
        "safetensors>=0.4",  # HF checkpoint interop without pickles
        "tqdm",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "matplotlib",  # report and experiment plots
    ],
    extras_require={
        # tests: parity against HF transformers on random tiny models, on the CPU build of torch
        "dev": ["pytest", "pytest-xdist", "hypothesis", "torch==2.13.0", "transformers>=4.51"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
    entry_points={"console_scripts": ["jaxstages=jaxstages.cli:main"]},
)
