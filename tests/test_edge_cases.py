"""Regression tests of the ops' edge cases found by fuzzing (issue 19): each failed before its fix. The
property-based sweep over the same inputs is tests/test_fuzz_ops.py."""

import pytest
import torch
from _testing import device_backends

import rlhf_fast
from rlhf_fast.ops import sampling as S

SAMPLERS = device_backends(S.SAMPLE_BACKENDS)


def sample_all(device, backend, logits, **params):
    with rlhf_fast.use_backend(backend):
        gen = torch.Generator(device=device).manual_seed(0)
        out = rlhf_fast.sample(logits.to(device), generator=gen, return_filtered_logprobs=True, **params)
    return tuple(o.cpu() for o in out)


@pytest.mark.parametrize("device,backend", SAMPLERS)
@pytest.mark.parametrize("temperature,min_p,scale", [(0.7, 1.0, 3.0), (0.3, 0.999999, 3.0), (1e-9, 0.0, 10.0),
                                                     (1e-30, 0.5, 1e4)])
def test_sample_keeps_the_argmax(device, backend, temperature, min_p, scale):
    """min_p = 1 (or ~1) and tiny temperatures keep exactly the argmax: its log-prob under the kept set is 0 and under
    the full distribution finite. The sampler once assumed exp(x / T - max / T) == 1 at the argmax, which rounding
    (and FMA contraction) breaks: it then returned token 0 with a +-inf log-prob."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1)) * scale
    tokens, logp, filtered = sample_all(device, backend, logits, temperature=temperature, min_p=min_p)
    assert torch.equal(tokens, logits.argmax(-1))
    assert filtered.abs().max() <= 1e-6
    assert logp.isfinite().all() and (logp <= 0).all()
