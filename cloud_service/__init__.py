"""The gkt cloud service: a large teacher writes the first k tokens of each answer (the guidance)."""
