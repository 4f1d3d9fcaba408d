"""The retrieval side: version hot-swap and interest refresh (``runtime``), top-k (``reader``),
metrics; depends on ``model`` and ``store`` only, usable by the CLI, bench and simulate without faust."""
