"""Recipes: what a command runs, built from the library and the engine.

- ``pretrain``: ``topoclip train`` and ``topoclip eval`` (config -> data, tokenizer, model ->
  engine -> evaluation -> results.json);
- ``finetune``: ``topoclip finetune`` (FT, the mixup family, WiSE-FT, the embedding shift);
- ``finetune_demo``: ``topoclip finetune-demo``.
"""
