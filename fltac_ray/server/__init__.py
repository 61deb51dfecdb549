"""The server side: the round's upload checks (uploads.py), screening and the attack simulation
(screening.py, attacks.py), K-means (clustering.py), the client-state store (state_store.py) and
the Server that runs the algorithm's aggregation and commits each round (server.py). No Ray here:
the Ray backend runs the Server as its coordinator actor."""
