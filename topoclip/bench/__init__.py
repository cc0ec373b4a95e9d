"""Benchmarks behind ``topoclip bench`` (application level: may import the engine and the recipes):

- ``loss``: the contrastive loss of each topology, plain and tiled, against OpenCLIP's
  ``ClipLoss`` and the three-GEMM floor (time and peak memory);
- ``max_batch``: the largest global batch whose exact training step fits in a memory budget;
- ``train_step``: topoclip's training step against OpenCLIP's own, on the same model.

Each measurement that needs a clean peak runs in its own process (``child``). The submodules
are imported by name (this package imports nothing, so ``python -m topoclip.bench.child`` runs
cleanly).
"""
