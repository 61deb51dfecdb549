"""The engine: the round loop (simulation.py) over two backends (ray_backend.py: worker and
coordinator actors; local_backend.py: one process), stateless client workers, the server side
with its client-state store, per-round scheduling, and the callbacks for side concerns."""
