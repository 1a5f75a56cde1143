"""avit_jax: A-ViT in JAX / Flax NNX. Install with `pip install -c constraints.txt -e .[test]`."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'jax[cpu]>=0.10',
    'flax>=0.12',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12',
    'chex>=0.1.92',
    'ml-collections>=1.1',
    'absl-py',
    'numpy',
    'tensorflow-cpu>=2.21',
    'tensorflow-datasets>=4.9.10',
    'importlib_resources',  # tfds imports it to build datasets (`tfds build imagenet2012`)
    'safetensors>=0.8',
    'tensorboardX>=2.6',
    'matplotlib>=3.11',
    'pillow',
    'tqdm',
]

# torch: 2.13.0 exactly. Other versions pull several GB of CUDA packages.
TORCH = ['torch==2.13.0']

setup(
    name='avit_jax',
    version='0.1.0',
    description='A-ViT (adaptive tokens for efficient vision transformers) in JAX / Flax NNX',
    packages=find_packages(include=['avit_jax', 'avit_jax.*', 'configs']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'torch': TORCH,
        'test': ['pytest>=9', 'chex>=0.1.92', 'transformers>=5', 'nbclient', 'nbformat',
                 'ipykernel'] + TORCH,
    },
)
