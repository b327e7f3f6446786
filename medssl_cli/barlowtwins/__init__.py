"""Barlow Twins, piece by piece as in facebookresearch/barlowtwins' ``main.py``.

``views`` (the two augmentation pipelines, GPU-batched), ``blur`` (their Gaussian blur), ``feed`` (one
step's pair of views from the pool, seeded per (seed, step, rank)), ``loss`` (the cross-correlation
loss), ``chunked`` (the loss for batches whose activations do not fit at once), ``optim`` (LARS and the
warmup + cosine schedule), ``rankme`` (the label-free collapse monitor). The training loop that uses
them is ``stages/pretrain``.
"""
