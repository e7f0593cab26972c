"""dpo_jax: direct preference optimisation in JAX / Flax NNX."""
import setuptools

# Versions run together on CPU (2026-11). Their APIs move fast; change them as a set.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "transformers==5.23.0",
    "datasets==5.2.0",
    "ml-collections==1.1.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "tqdm",
    "numpy",
]

EXTRAS = {
    # torch 2.13.0 is the CPU build on local disk; it is the PyTorch reference in parity tests.
    # tensorboard reads the event files back (writers.EventFile writes them without it).
    "test": ["pytest", "pytest-xdist", "hypothesis", "torch==2.13.0", "tensorboard==2.21.0"],
    "plot": ["matplotlib"],
}

setuptools.setup(
    name="dpo_jax",
    version="0.1.0",
    description="DPO and its family of preference losses in JAX / Flax NNX",
    packages=setuptools.find_packages(include=["dpo_jax", "dpo_jax.*"]),
    package_data={"dpo_jax": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
