"""Suite-wide settings: one intra-op thread per test process.

The suite runs under pytest-xdist with one worker per core; extra OpenMP threads per worker
only spin against each other on small tensors (measured ~20x slower on 2 shared cores).
"""

import torch

torch.set_num_threads(1)
