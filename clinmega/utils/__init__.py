"""Helpers every layer may use (the bottom of the layering, below ``config``): lazy package exports,
atomic publishing of files and folders, quiet handling of third-party warnings."""
