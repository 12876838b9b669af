"""One folder per op: vitattn/ops/<op>/ holds everything about how the op runs.

- op.py: the public function(s), validation, ``explain`` and the torch.library custom ops;
- backends.py: every backend's adapter (can-run check, rank, implementation) and the
  dispatcher;
- torch_impl.py: the "torch" backend's math; reference.py: the dense reference
  (vitattn.reference.<fn>); measured.json: measurements that rank "auto" per shape class.

Kernels live outside the package tree: Triton in kernels/<op>.py (vitattn.kernels.<op>),
C++ / CUDA in csrc/cpu/<op>* and csrc/cuda/<op>*. The public functions are re-exported by
vitattn/__init__.py; this package exports no function named like a module.
"""
