"""HyMiRec: a streaming, online-learning, multi-interest recommender."""

__version__ = "0.1.0"
