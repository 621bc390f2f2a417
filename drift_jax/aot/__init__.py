"""Ahead-of-time compiles for accelerators this host does not have: every device program
of a run, compiled for an H100, an H200 or a TPU topology at the run's shapes, with its
memory, FLOPs, bytes and roofline time (``targets``, ``compile``, ``pipeline``)."""
