"""The chexpert corpus as a tfds dataset (see chexpert_dataset_builder.py)."""

from data_pipelines.chexpert.chexpert_dataset_builder import Builder

__all__ = ["Builder"]
