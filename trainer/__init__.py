"""Offline and online training: data, metrics, evaluation harness, publishing versions."""
