"""Shared test set-up.

The Triton interpreter must be switched on *before* triton is first imported (kernels are decorated at import time),
so it is done here, at collection, unless a real GPU is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys

# tests import the flat top-level files (model.py, cache.py, ...) directly
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# one thread: on 2-core CI boxes two threads contend with the interpreter and run 5-10x slower (measured)
torch.set_num_threads(1)
