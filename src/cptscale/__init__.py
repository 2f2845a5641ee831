"""cptscale: cross-lingual continual pre-training scaling studies, end to end."""

__version__ = "0.1.0"
