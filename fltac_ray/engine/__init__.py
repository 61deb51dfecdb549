"""The engine: the round loop (simulation.py) with its set-up (run_setup.py), evaluation reuse
(evaluation.py, evaluation_cache.py) and tables (round_tables.py), over two backends behind one
contract (backend.py): Ray (ray/: worker and coordinator actors) and local_backend.py (one
process); per-round scheduling and the callbacks for side concerns."""
