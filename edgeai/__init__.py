"""edgeai: an on-device inference runtime for small language models on MLX."""

__version__ = "0.1.0"
