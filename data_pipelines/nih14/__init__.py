"""The nih14 corpus as a tfds dataset (see nih14_dataset_builder.py)."""

from data_pipelines.nih14.nih14_dataset_builder import Builder

__all__ = ["Builder"]
