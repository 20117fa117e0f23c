"""Datasets, splits and the shared MONAI transforms."""
