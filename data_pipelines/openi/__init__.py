"""The openi corpus as a tfds dataset (see openi_dataset_builder.py)."""

from data_pipelines.openi.openi_dataset_builder import Builder

__all__ = ["Builder"]
