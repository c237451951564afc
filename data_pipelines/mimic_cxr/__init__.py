"""MIMIC-CXR-JPG 2.x images + MIMIC-CXR reports as a tfds dataset (`mimic_cxr`)."""

from data_pipelines.mimic_cxr.mimic_cxr_dataset_builder import Builder

__all__ = ["Builder"]
