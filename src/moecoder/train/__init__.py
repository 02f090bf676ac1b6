"""Training: corpus build, tokenizer training, packed token shards, window loader, and the training loop.

Kept import-free so `moecoder --help` and spawned tokeniser workers stay fast; import submodules directly.
"""
