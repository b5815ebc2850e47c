"""clseg_jax: continual learning for image segmentation and classification in JAX/Flax NNX."""
