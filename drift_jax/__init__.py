"""drift-jax: DRIFT in JAX."""
