"""batchtts: narrate a manifest of texts into audio files, resumably."""

__version__ = "0.1.0"
