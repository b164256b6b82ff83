"""The missing-modality benchmark protocol: datasets, missing tables, preprocessing, pipeline, metrics."""
