"""Evaluation harness: benchmark loaders, prompt strategies, scoring, backends and reports."""
