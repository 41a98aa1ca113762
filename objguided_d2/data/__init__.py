"""Datasets, the shared dataset mapper and synthetic data."""
