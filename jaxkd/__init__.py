"""jaxkd: cross-architecture knowledge distillation for image classifiers in JAX/Flax."""

__version__ = "0.1.0"
