"""avit_jax: A-ViT (adaptive tokens for efficient vision transformers) in JAX / Flax NNX."""

__version__ = '0.1.0'
