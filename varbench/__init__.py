"""varbench: a reference harness for training-free acceleration of next-scale (VAR) image generators."""
__version__ = "0.2.0"
