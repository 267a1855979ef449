"""aeir_jax: AEIR (transferable image-sentence retrieval) in JAX/Flax."""

__version__ = "0.1.0"
