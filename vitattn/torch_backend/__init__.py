"""The "torch" backend: memory-bounded PyTorch implementations used where no kernel runs."""
