"""Suite-wide settings: one intra-op thread per test process.

The suite runs under pytest-xdist with one worker per core; extra OpenMP threads per worker
only spin against each other on small tensors (measured ~20x slower on 2 shared cores).
"""

import os
import tempfile

import torch

torch.set_num_threads(1)

# The bf16 CPU kernel (moecoder.kernels) is built at first use; build it into a per-run folder, not
# the user's ~/.cache (subprocesses started by tests inherit this).
if "MOECODER_CACHE" not in os.environ:
    os.environ["MOECODER_CACHE"] = tempfile.mkdtemp(prefix="moecoder-test-cache-")
