"""The bundled real sample as a tfds dataset (`cxr_sample/paired`, `text_only`, `image_only`,
`nih_halves`)."""

from data_pipelines.cxr_sample.cxr_sample_dataset_builder import Builder, split_for_patient

__all__ = ["Builder", "split_for_patient"]
