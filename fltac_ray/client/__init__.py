"""The client's compute: local training one adapter at a time (training.py) and many per pass
(batched_training.py), batched evaluation, the stacked optimisers, precision and loss scaling,
and the stateless worker that runs a round's jobs over one frozen base (worker.py) with its GPU
checks (cuda_device.py, gpu_fit.py). No Ray here: the Ray backend wraps the worker in an actor."""
