"""The ``gkt`` command: models, a local cloud + edge, and asking questions."""
