"""Code both sides of gkt use: the wire protocol, the error table, tasks, the model registry."""
