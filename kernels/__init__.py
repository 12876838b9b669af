"""Triton kernels of vitattn, installed as the subpackage ``vitattn.kernels``.

Each module is named after its op and holds that op's kernels and launchers:
plain tensors in, tensors out. Nothing here knows about nn.Module or dispatch.
"""
