"""Differential privacy: the mechanism (clipping, Gaussian noise), the accounting (dp-accounting)
and a run's privacy plan. No Ray; the worker applies the mechanism, the driver keeps the ledger."""
