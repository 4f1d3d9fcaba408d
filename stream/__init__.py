"""Kafka side: local broker, event contract, Faust app and agents, datasets, replay."""
