"""Sinkhorn optimal transport (SeTformer / OTKE): sinkhorn, ot_aggregate, ot_attention and
the Gaussian position filters; see op.py (public functions) and backends.py."""
