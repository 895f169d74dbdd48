"""The attested aggregator: the hub's admission and aggregation of updates only it can open (shared/attested_seal.py)."""
