"""flows.linalg.gram: the panel-wise K Kᵀ equals the plain product, also batched and under vmap."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from flows.linalg import GRAM_MIN_ROWS, gram


@given(d=st.integers(1, 2 * GRAM_MIN_ROWS + 37), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_gram_equals_the_plain_product(d, n, seed):
    k = torch.randn(d, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out = gram(k)
    torch.testing.assert_close(out, k @ k.T, rtol=1e-13, atol=1e-12)


def test_gram_batches_and_vmaps():
    k = torch.randn(3, GRAM_MIN_ROWS + 5, 7, dtype=torch.float64)
    reference = k @ k.mT
    torch.testing.assert_close(gram(k), reference, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(gram)(k), reference, rtol=1e-13, atol=1e-12)
