"""Data: corpus registry, sources and mixing, random-access records, augmentation, the batch
layout, train and eval streams."""
