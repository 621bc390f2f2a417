from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="drift-jax",
    version="0.1.0",
    description="DRIFT (Decoupled Rollouts and Importance-Weighted Fine-Tuning) in JAX / Flax NNX",
    packages=find_packages(include=["drift_jax", "drift_jax.*"]),
    python_requires=">=3.11",
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        # What drift_jax.data.questions needs for tfds sources (its ImportError names the same).
        "data": ["tensorflow-datasets>=4.9", "tensorflow>=2.15", "datasets>=2.14"],
    },
)
