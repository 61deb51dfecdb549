"""Ray plumbing: the Ray backend (backend.py: worker pool, actors, retrying executor), the Ray
session fltac-ray starts (session.py), GPU visibility in Ray processes, data shared through the
object store across a sweep's trials (shared_data.py) and live metrics for the dashboard
(telemetry.py). Everything Ray-specific lives here."""
