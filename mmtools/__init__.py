"""mmtools: command-line pipelines for curating multimodal training data."""

__version__ = "0.1.0"
