"""Batch augmenters; registered under `kdbench.augmenters`."""
