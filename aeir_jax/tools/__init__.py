"""Command-line tools (`python -m aeir_jax.tools.<name>`)."""
