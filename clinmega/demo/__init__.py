"""The CPU demo: synthetic data and the end-to-end pipeline."""
