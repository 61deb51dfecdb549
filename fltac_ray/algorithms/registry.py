"""Names of the federated algorithms, importable without torch (config validation stays fast)."""

from __future__ import annotations

ALGORITHMS: dict[str, str] = {
    "fltac": "FL-TAC: one low-rank adapter per (client, task); server K-means + per-cluster FedAvg",
}
