"""Depthwise 2-d convolution on channels-last (B, H, W, C) activations: see op.py (public
function) and backends.py."""
