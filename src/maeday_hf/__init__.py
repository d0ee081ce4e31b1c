"""MAEDAY: zero- and few-shot image anomaly detection with a Masked Autoencoder, Hugging Face native."""

__version__ = "0.1.0"
