"""Datasets: native readers, modality encodings, WebDataset sharding and loading, the demo."""
