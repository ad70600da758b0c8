"""The gkt edge agent: a small student finishes answers the cloud teacher began."""
