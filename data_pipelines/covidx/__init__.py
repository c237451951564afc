"""The covidx corpus as a tfds dataset (see covidx_dataset_builder.py)."""

from data_pipelines.covidx.covidx_dataset_builder import Builder

__all__ = ["Builder"]
