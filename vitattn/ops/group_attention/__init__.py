"""SReT's group / permuted attention: see op.py (public function) and backends.py."""
