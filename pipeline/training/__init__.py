"""Training: Lightning modules, data streams, trainers, callbacks."""
