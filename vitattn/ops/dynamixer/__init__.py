"""DynaMixer's dynamic axial mixing: see op.py (public function) and backends.py."""
