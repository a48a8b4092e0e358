"""vlmexp: K-fold SFT of vision-language models for image-classification competitions."""

__version__ = "0.1.0"
