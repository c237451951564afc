"""The rsna_pneumonia corpus as a tfds dataset (see rsna_pneumonia_dataset_builder.py)."""

from data_pipelines.rsna_pneumonia.rsna_pneumonia_dataset_builder import Builder

__all__ = ["Builder"]
