"""resdense_jax: Res-Dense Net for 3-D chest CT classification, in JAX/Flax, exact to Keras Applications."""

__version__ = "0.1.0"
