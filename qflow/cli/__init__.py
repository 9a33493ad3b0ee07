"""Command-line interface (``qflow``)."""
