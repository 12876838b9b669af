"""Manhattan self-attention (RMT): see op.py (public function) and backends.py."""
