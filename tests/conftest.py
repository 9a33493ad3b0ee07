"""Shared test set-up."""

import torch

# The test models are tiny: one thread is faster than two (and far faster when the
# machine is shared), and it keeps float32 training reproducible.
torch.set_num_threads(1)

