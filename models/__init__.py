"""The fusion model: network, datasets, training, export and inference backends."""
