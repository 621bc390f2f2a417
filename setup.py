from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

# The JAX version of the accelerator extras (cuda13, tpu).
ACCELERATOR_JAX = "0.10.2"

setup(
    name="drift-jax",
    version="0.1.0",
    description="DRIFT (Decoupled Rollouts and Importance-Weighted Fine-Tuning) in JAX / Flax NNX",
    packages=find_packages(include=["drift_jax", "drift_jax.*"]),
    # The H100 target spec that drift_jax.aot compiles against.
    package_data={"drift_jax.aot": ["specs/*.txtpb"]},
    python_requires=">=3.11",
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        # What drift_jax.data.sources needs for "huggingface:" / "tfds:" question sources (its
        # ImportError names the same list, TFDS_PACKAGES): it reads them with tfds.load and
        # tfds.as_numpy, a tf.data pipeline, so TensorFlow itself is required (tfds's
        # TensorFlow-free tfds.data_source is not used), and tfds's huggingface: builder
        # downloads through the datasets library. Local .jsonl/.json/.parquet files need none.
        "data": ["tensorflow-datasets>=4.9", "tensorflow>=2.15", "datasets>=2.14"],
        # The accelerator builds of the JAX version that the ahead-of-time compile for H100
        # and TPU checks (docs/scaling.md): jax[cuda13] brings jaxlib's CUDA 13 plugin and
        # the CUDA libraries, jax[tpu] libtpu. Pinned, so an install gets the version those
        # programs were compiled with rather than the newest release.
        "cuda13": [f"jax[cuda13]=={ACCELERATOR_JAX}"],
        "tpu": [f"jax[tpu]=={ACCELERATOR_JAX}"],
    },
)
