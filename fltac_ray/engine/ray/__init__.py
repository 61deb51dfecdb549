"""Ray plumbing: the Ray backend (backend.py) over its actors (actors.py), worker pool (pool.py)
and retrying executor (executor.py), the Ray
session fltac-ray starts (session.py), GPU visibility in Ray processes, data shared through the
object store across a sweep's trials (shared_data.py) and live metrics for the dashboard
(telemetry.py). Everything Ray-specific lives here."""
