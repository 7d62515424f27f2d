"""Advantage ops: GAE and discounted returns on every backend against the fp64 reference loop; masked
mean/variance/whitening and group advantages against hand-computed values; opcheck, torch.compile, bad input."""


import numpy as np
import pytest
import torch
from _testing import assert_within_ref_error, compiles_for_hopper, device_backends, usable_backends

import rlhf_fast
from rlhf_fast import _backend
from rlhf_fast.ops import advantages as A

BACKENDS = device_backends(A.SCAN_BACKENDS)
MASK_KINDS = ["full", "right_pad", "left_pad", "holes", "random", "empty_row"]
GAMMA_LAM = [(0.0, 0.0), (0.5, 0.95), (0.95, 1.0), (1.0, 0.5), (1.0, 1.0), (0.95, 0.0)]  # each of 0, 0.5, 0.95, 1
SMALL_FOR_TRITON = 64  # the Triton interpreter is slow: longer sequences run on the compiled backends only


def make_mask(kind: str, n_rows: int, n_steps: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] bool: response tokens as laid out by right padding, left padding, multi-turn holes, ..."""
    lengths = torch.randint(0, n_steps + 1, (n_rows,), generator=gen)
    lengths[0] = n_steps  # one full row
    steps = torch.arange(n_steps)
    if kind == "full":
        return torch.ones(n_rows, n_steps, dtype=torch.bool)
    if kind == "right_pad":
        return steps[None, :] < lengths[:, None]
    if kind == "left_pad":
        return steps[None, :] >= (n_steps - lengths)[:, None]
    if kind == "holes":  # alternating response and observation stretches, then right padding
        stretch = max(1, n_steps // 5)
        return ((steps // stretch) % 2 == 0)[None, :] & (steps[None, :] < lengths[:, None])
    if kind == "random":
        return torch.rand(n_rows, n_steps, generator=gen) < 0.6
    mask = torch.rand(n_rows, n_steps, generator=gen) < 0.6  # "empty_row": one row entirely masked
    mask[n_rows // 2] = False
    return mask


def make_inputs(n_rows, n_steps, kind="random", dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n_rows, n_steps, generator=gen).to(dtype)
    values = torch.randn(n_rows, n_steps, generator=gen).to(dtype)
    mask = make_mask(kind, n_rows, n_steps, gen)
    return rewards.to(device), values.to(device), mask.to(device)


def check_gae(backend, rewards, values, mask, gamma, lam, name):
    """gae on ``backend`` vs the fp64 loop, within the tolerance rule (the fp32 loop's own error, doubled)."""
    with rlhf_fast.use_backend(backend):
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam)
    g64 = gamma.double() if isinstance(gamma, torch.Tensor) else gamma
    l64 = lam.double() if isinstance(lam, torch.Tensor) else lam
    exact = A.gae_ref(rewards.double(), values.double(), mask, g64, l64)
    lowp = A.gae_ref(rewards, values, mask, gamma, lam)
    for what, out, e, r in zip(("advantages", "returns"), (adv, ret), exact, lowp):
        assert out.dtype == torch.float32 and out.shape == rewards.shape and out.is_contiguous()
        assert (out[~mask] == 0).all(), f"{name} {what}: nonzero at masked positions"
        assert_within_ref_error(out, r, e, name=f"{name} {what}")


def check_returns(backend, rewards, mask, gamma, name):
    with rlhf_fast.use_backend(backend):
        out = rlhf_fast.discounted_returns(rewards, mask, gamma=gamma)
    g64 = gamma.double() if isinstance(gamma, torch.Tensor) else gamma
    exact = A.discounted_returns_ref(rewards.double(), mask, g64)
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    assert (out[~mask] == 0).all()
    assert_within_ref_error(out, A.discounted_returns_ref(rewards, mask, gamma), exact, name=name)


# ---------------------------------------------------------------------------------------------------------------
# GAE and discounted returns
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_hand_computed_example(device, backend):
    # gamma = lam = 0.5; position 1 is an observation (mask 0) holding values that must be skipped.
    #   t=3: delta = 2 + 0.5*0 - 4 = -2                         A = -2
    #   t=2: delta = 0 + 0.5*4 - 2 = 0                          A = 0 + 0.25*(-2) = -0.5
    #   t=1: skipped (next value 2 and A = -0.5 carry over)
    #   t=0: delta = 1 + 0.5*2 - 1 = 1                          A = 1 + 0.25*(-0.5) = 0.875
    rewards = torch.tensor([[1.0, 9.0, 0.0, 2.0]], device=device)
    values = torch.tensor([[1.0, 9.0, 2.0, 4.0]], device=device)
    mask = torch.tensor([[1, 0, 1, 1]], device=device, dtype=torch.bool)
    with rlhf_fast.use_backend(backend):
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.5, lam=0.5)
        disc = rlhf_fast.discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(adv.cpu(), torch.tensor([[0.875, 0.0, -0.5, -2.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(ret.cpu(), torch.tensor([[1.875, 0.0, 1.5, 2.0]]), rtol=0, atol=1e-6)
    # R3 = 2, R2 = 0 + 0.5*2 = 1, R1 skipped, R0 = 1 + 0.5*1 = 1.5
    torch.testing.assert_close(disc.cpu(), torch.tensor([[1.5, 0.0, 1.0, 2.0]]), rtol=0, atol=1e-6)


def all_mask_kinds(rows_per_kind, n_steps, seed, device):
    """Inputs whose rows cover every mask kind (rows are independent, so one call checks them all)."""
    parts = [make_inputs(rows_per_kind, n_steps, kind, seed=seed + i, device=device)
             for i, kind in enumerate(MASK_KINDS)]
    return tuple(torch.cat(xs) for xs in zip(*parts))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_gae_matches_reference(device, backend, gamma, lam):
    interpreted = backend == "triton" and device == "cpu"  # every row costs ~50 ms in the interpreter
    longer = 19 if interpreted else 300  # 300: several tiles of the CUDA warp scan
    for rows_per_kind, n_steps in [(1 if interpreted else 3, 7), (1, 1), (1, longer)]:
        rewards, values, mask = all_mask_kinds(rows_per_kind, n_steps, seed=n_steps, device=device)
        check_gae(backend, rewards, values, mask, gamma, lam, f"{backend} T={n_steps}")
        check_returns(backend, rewards, mask, gamma, f"{backend} returns T={n_steps}")
    rewards, values, mask = make_inputs(1, 23, "holes", seed=23, device=device)  # B = 1
    check_gae(backend, rewards, values, mask, gamma, lam, f"{backend} B=1")


def scalar_loop(rewards, values, mask, gamma, lam, scalar):
    """The FORMULAS loop on Python scalars of type ``scalar`` (float: fp64, np.float32: fp32), row by row: the
    reference for long sequences, where a loop of torch ops over T would take seconds."""
    g, gl = scalar(gamma), scalar(gamma) * scalar(lam)
    adv, ret = [], []
    for r_row, v_row, m_row in zip(rewards.tolist(), values.tolist(), mask.tolist()):
        next_v = running = scalar(0.0)
        a_row, ret_row = [0.0] * len(r_row), [0.0] * len(r_row)
        for t in reversed(range(len(r_row))):
            if m_row[t]:
                v = scalar(v_row[t])
                running = scalar(r_row[t]) + g * next_v - v + gl * running
                next_v = v
                a_row[t], ret_row[t] = float(running), float(running + v)
        adv.append(a_row)
        ret.append(ret_row)
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("n_rows,n_steps", [(3, 4096), (1, 16384)])
def test_long_sequences_keep_fp32_accuracy(device, backend, n_rows, n_steps):
    if backend == "torch":
        pytest.skip("the torch backend is the reference loop itself")
    if backend == "triton" and device == "cpu":
        pytest.skip("long sequences are too slow in the Triton interpreter (run on GPU by gpu_check.sh)")
    rewards, values, mask = make_inputs(n_rows, n_steps, "holes", seed=1)
    zeros = torch.zeros_like(values)
    for gamma, lam in [(1.0, 1.0), (0.999, 0.95)]:  # gamma = lam = 1: 16k-term sums, the worst case for fp32
        with rlhf_fast.use_backend(backend):
            out = rlhf_fast.gae(rewards.to(device), values.to(device), mask.to(device), gamma=gamma, lam=lam)
            returns = rlhf_fast.discounted_returns(rewards.to(device), mask.to(device), gamma=gamma)
        exact = scalar_loop(rewards, values, mask, gamma, lam, float)
        lowp = scalar_loop(rewards, values, mask, gamma, lam, np.float32)
        for what, o, e, r in zip(("advantages", "returns"), out, exact, lowp):
            assert_within_ref_error(o.cpu(), r, e, name=f"{backend} T={n_steps} gamma={gamma} {what}")
        # discounted returns = GAE with values 0 and lam 1
        assert_within_ref_error(returns.cpu(), scalar_loop(rewards, zeros, mask, gamma, 1.0, np.float32)[0],
                                scalar_loop(rewards, zeros, mask, gamma, 1.0, float)[0],
                                name=f"{backend} T={n_steps} discounted returns")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_large_batch_rows_match_rows_alone(device, backend):
    """A batch big enough to be split across threads (cpp) or chunks (cuda): each row as if run alone."""
    if backend in ("torch", "triton") and device == "cpu":
        pytest.skip("too slow for the reference loop / Triton interpreter; only the split across threads is at stake")
    rewards, values, mask = make_inputs(160, 4096, "holes", seed=12, device=device)
    with rlhf_fast.use_backend(backend):
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95)
        for b in (0, 77, 159):
            row = rlhf_fast.gae(rewards[b:b + 1], values[b:b + 1], mask[b:b + 1], gamma=0.99, lam=0.95)
            torch.testing.assert_close(adv[b:b + 1], row[0], rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(ret[b:b + 1], row[1], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("n_steps", [5, 8, 301])
def test_row_blocks_match_rows_alone(device, backend, n_steps):
    """The cpp backend scans contiguous float32 rows 8 at a time (SIMD lanes, steps in tiles of 8, the first T % 8
    one by one) and the others alone: both give the same bits, whatever the mask kinds and per-row factors."""
    rewards, values, mask = all_mask_kinds(3, n_steps, seed=n_steps, device=device)  # 18 rows: 2 blocks + 2 alone
    gen = torch.Generator().manual_seed(n_steps)
    gamma, lam = torch.rand(len(rewards), generator=gen).to(device), torch.rand(len(rewards), generator=gen).to(device)
    with rlhf_fast.use_backend(backend):
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam)
        returns = rlhf_fast.discounted_returns(rewards, mask, gamma=gamma)
        for b in range(len(rewards)):
            row = rlhf_fast.gae(rewards[b:b + 1], values[b:b + 1], mask[b:b + 1], gamma=gamma[b:b + 1],
                                lam=lam[b:b + 1])
            torch.testing.assert_close(adv[b:b + 1], row[0], rtol=0, atol=0, msg=f"row {b} advantages")
            torch.testing.assert_close(ret[b:b + 1], row[1], rtol=0, atol=0, msg=f"row {b} returns")
            alone = rlhf_fast.discounted_returns(rewards[b:b + 1], mask[b:b + 1], gamma=gamma[b:b + 1])
            torch.testing.assert_close(returns[b:b + 1], alone, rtol=0, atol=0, msg=f"row {b} discounted returns")
    check_gae(backend, rewards, values, mask, gamma, lam, f"{backend} T={n_steps} per-row factors")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_per_sequence_gamma_and_lam(device, backend):
    rewards, values, mask = make_inputs(6, 29, "holes", seed=2, device=device)
    gamma = torch.tensor([0.0, 0.5, 0.95, 1.0, 0.99, 0.3], device=device)
    lam = torch.tensor([1.0, 0.0, 0.95, 0.5, 1.0, 0.7], device=device)
    check_gae(backend, rewards, values, mask, gamma, lam, f"{backend} per-sequence")
    check_gae(backend, rewards, values, mask, gamma, 0.9, f"{backend} per-sequence gamma")
    check_gae(backend, rewards, values, mask, 0.9, lam.double(), f"{backend} per-sequence lam (float64)")
    check_returns(backend, rewards, mask, gamma.half(), f"{backend} returns per-sequence")
    # each row equals the same row run alone with scalar factors
    with rlhf_fast.use_backend(backend):
        adv, _ = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=lam)
        for b in (1, 4):
            row, _ = rlhf_fast.gae(rewards[b:b + 1], values[b:b + 1], mask[b:b + 1], gamma=gamma[b].item(),
                                   lam=lam[b].item())
            torch.testing.assert_close(adv[b:b + 1], row)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs(device, backend, dtype):
    rewards, values, mask = make_inputs(4, 45, "right_pad", dtype=dtype, seed=3, device=device)
    check_gae(backend, rewards, values, mask, 0.99, 0.95, f"{backend} {dtype}")
    check_returns(backend, rewards, mask, 0.99, f"{backend} returns {dtype}")
    # rewards and values in different dtypes are promoted
    check_gae(backend, rewards, values.float(), mask, 0.99, 0.95, f"{backend} {dtype} + float32")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs(device, backend):
    rewards, values, mask = make_inputs(9, 40, "holes", seed=4, device=device)
    # transposed storage ([T, B] in memory) and every other step of a wider tensor
    check_gae(backend, rewards.t().contiguous().t(), values.t().contiguous().t(), mask.t().contiguous().t(), 0.9,
              0.8, f"{backend} transposed")
    check_gae(backend, rewards[:, ::2], values[:, ::2], mask[:, ::2], 0.9, 0.8, f"{backend} strided")
    check_returns(backend, rewards[::2, 1::3], mask[::2, 1::3], 0.9, f"{backend} returns strided")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_positions_are_never_read(device, backend):
    rewards, values, mask = make_inputs(12, 37, "holes", seed=5, device=device)  # cpp: one block of 8 rows + 4 alone
    junk_r = torch.where(mask, rewards, float("nan"))
    junk_v = torch.where(mask, values, float("inf"))
    with rlhf_fast.use_backend(backend):
        clean = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.95)
        junk = rlhf_fast.gae(junk_r, junk_v, mask, gamma=0.9, lam=0.95)
        torch.testing.assert_close(rlhf_fast.discounted_returns(junk_r, mask, gamma=0.9),
                                   rlhf_fast.discounted_returns(rewards, mask, gamma=0.9))
    for c, j in zip(clean, junk):
        torch.testing.assert_close(j, c)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_integer_and_float_masks(device, backend):
    rewards, values, mask = make_inputs(3, 21, "random", seed=6, device=device)
    with rlhf_fast.use_backend(backend):
        expected = rlhf_fast.gae(rewards, values, mask, gamma=0.9, lam=0.9)
        for dtype in (torch.uint8, torch.int64, torch.float32, torch.bfloat16):
            for e, o in zip(expected, rlhf_fast.gae(rewards, values, mask.to(dtype), gamma=0.9, lam=0.9)):
                torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_and_no_grad(device, backend):
    with rlhf_fast.use_backend(backend):
        for shape in [(0, 5), (3, 0)]:
            x = torch.randn(shape, device=device)
            adv, ret = rlhf_fast.gae(x, x, x > 0, gamma=0.9, lam=0.9)
            assert adv.shape == shape and ret.shape == shape
            assert rlhf_fast.discounted_returns(x, x > 0, gamma=0.9).shape == shape
        rewards = torch.randn(2, 5, device=device, requires_grad=True)
        adv, ret = rlhf_fast.gae(rewards, rewards * 2, rewards > 0, gamma=0.9, lam=0.9)
    assert not adv.requires_grad and not ret.requires_grad  # advantages are constants of the PPO loss


def test_triton_tiles_carry_state():
    """Several tiles per sequence (a tile of 4 steps) in the Triton kernel: the carries between tiles."""
    if not (_backend.built("triton") and _backend.runs_on("triton", torch.device("cpu"))):
        pytest.skip("Triton runs on CPU tensors only in the interpreter (TRITON_INTERPRET=1)")
    from rlhf_fast.kernels import advantages as K

    rewards, values, mask = make_inputs(3, 13, "holes", seed=7)
    gamma = torch.tensor([0.9, 1.0, 0.5])
    for block in (2, 4, 8):
        adv, ret = K.gae_fwd(rewards, values, mask, gamma, None, 0.0, 0.95, block=block)
        exact = A.gae_ref(rewards.double(), values.double(), mask, gamma.double(), 0.95)
        torch.testing.assert_close(adv.double(), exact[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ret.double(), exact[1], atol=1e-5, rtol=1e-5)
        out = K.discounted_returns_fwd(rewards, mask, None, 0.9, block=block)
        torch.testing.assert_close(out.double(), A.discounted_returns_ref(rewards.double(), mask, 0.9), atol=1e-5,
                                   rtol=1e-5)


COMPILE_FOR_HOPPER = """
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast.kernels.advantages import _gae_fwd_kernel

signature = dict(r_ptr="*bf16", v_ptr="*bf16", m_ptr="*u8", gamma_seq_ptr="*fp32", lam_seq_ptr="*fp32",
                 adv_ptr="*fp32", ret_ptr="*fp32", gamma="fp32", lam="fp32")
signature.update(dict.fromkeys(["n_steps", "stride_rb", "stride_rt", "stride_vb", "stride_vt", "stride_mb",
                                "stride_mt"], "i32"))
signature.update(dict.fromkeys(["HAS_VALUES", "GAMMA_SEQ", "LAM_SEQ", "BLOCK"], "constexpr"))
for has_values, block, warps in [(True, 1024, 4), (False, 64, 1)]:
    constexprs = dict(HAS_VALUES=has_values, GAMMA_SEQ=True, LAM_SEQ=has_values, BLOCK=block)
    kernel = compile(ASTSource(fn=_gae_fwd_kernel, signature=signature, constexprs=constexprs),
                     target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    assert len(kernel.asm["cubin"]) > 0
print("compiled")
"""


def test_triton_kernel_compiles_for_hopper():
    """The Triton kernel compiled for sm_90 without a GPU: what the interpreter cannot check (types, lowering)."""
    compiles_for_hopper(COMPILE_FOR_HOPPER)


@pytest.mark.parametrize("backend", usable_backends(("cuda",), "cuda"))
@pytest.mark.parametrize("algorithm", [1, 2, 3], ids=["thread_per_sequence", "warp_scan", "chunked_scan"])
def test_cuda_algorithms(backend, algorithm):
    """Each CUDA kernel, forced (the automatic choice picks one by shape); 4099 steps make 5 chunks."""
    for n_rows, n_steps, dtype in [(7, 1, torch.float32), (5, 300, torch.bfloat16), (3, 4099, torch.float32)]:
        rewards, values, mask = make_inputs(n_rows, n_steps, "holes", dtype=dtype, seed=n_steps, device="cuda")
        gamma = torch.rand(n_rows, device="cuda")
        transposed = (rewards.t().contiguous().t(), values, mask.t().contiguous().t())
        for r, v, m in [(rewards, values, mask), transposed]:
            adv, ret = torch.ops.rlhf_fast_C.gae_fwd(r, v, m, gamma, None, 0.0, 0.95, algorithm)
            exact = A.gae_ref(r.double(), v.double(), m, gamma.double(), 0.95)
            lowp = A.gae_ref(r, v, m, gamma, 0.95)
            assert_within_ref_error(adv, lowp[0], exact[0], name=f"cuda algo {algorithm} T={n_steps} adv")
            assert_within_ref_error(ret, lowp[1], exact[1], name=f"cuda algo {algorithm} T={n_steps} ret")
            out = torch.ops.rlhf_fast_C.discounted_returns_fwd(r, m, None, 0.9, algorithm)
            assert_within_ref_error(out, A.discounted_returns_ref(r, m, 0.9),
                                    A.discounted_returns_ref(r.double(), m, 0.9), name=f"cuda algo {algorithm} ret")


# ---------------------------------------------------------------------------------------------------------------
# Masked statistics and group advantages
# ---------------------------------------------------------------------------------------------------------------


def test_masked_mean_var_whiten_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert rlhf_fast.masked_mean(x, mask).item() == 2.0
    assert rlhf_fast.masked_var(x, mask).item() == 1.0  # ((-1)^2 + 0 + 1^2) / (3 - 1)
    torch.testing.assert_close(rlhf_fast.masked_var(x, mask, unbiased=False), torch.tensor(2.0 / 3.0))
    torch.testing.assert_close(rlhf_fast.masked_whiten(x, mask), (x - 2.0) / (1.0 + 1e-8) ** 0.5)
    torch.testing.assert_close(rlhf_fast.masked_whiten(x, mask, shift_mean=False), (x - 2.0) / (1 + 1e-8) ** 0.5 + 2)
    x2 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m2 = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(rlhf_fast.masked_mean(x2, m2, dim=1), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(rlhf_fast.masked_mean(x2, m2, dim=-2), torch.tensor([1.0, 2.0, 0.0]))


def test_masked_statistics_of_empty_and_single_selections_are_finite():
    x = torch.randn(3, 4)
    none = torch.zeros(3, 4, dtype=torch.bool)
    one = none.clone()
    one[1, 2] = True
    assert rlhf_fast.masked_mean(x, none).item() == 0.0 and rlhf_fast.masked_var(x, none).item() == 0.0
    assert rlhf_fast.masked_var(x, one).item() == 0.0 and rlhf_fast.masked_mean(x, one).item() == x[1, 2].item()
    assert torch.isfinite(rlhf_fast.masked_whiten(x, none)).all() and rlhf_fast.masked_whiten(x, one)[1, 2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_statistics_values_and_gradients(dtype):
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(4, 9, generator=gen) * 3 + 1).to(dtype)
    mask = torch.rand(4, 9, generator=gen) < 0.7
    g = torch.randn(4, 9, generator=gen)
    cases = [
        ("mean", lambda f, x: f(x, mask), rlhf_fast.masked_mean, A.masked_mean_ref),
        ("mean dim", lambda f, x: f(x, mask, 1) * g[:, 0], rlhf_fast.masked_mean, A.masked_mean_ref),
        ("var", lambda f, x: f(x, mask), rlhf_fast.masked_var, A.masked_var_ref),
        ("var biased", lambda f, x: f(x, mask, False), rlhf_fast.masked_var, A.masked_var_ref),
        ("whiten", lambda f, x: f(x, mask) * g, lambda x, m: rlhf_fast.masked_whiten(x, m), A.masked_whiten_ref),
        ("whiten no shift", lambda f, x: f(x, mask) * g,
         lambda x, m: rlhf_fast.masked_whiten(x, m, shift_mean=False, eps=1e-3),
         lambda x, m: A.masked_whiten_ref(x, m, False, 1e-3)),
    ]
    for name, call, op, ref in cases:
        leaf = x.clone().requires_grad_()
        out = call(op, leaf)
        out.sum().backward()
        exact_leaf = x.double().requires_grad_()
        exact = call(ref, exact_leaf)
        exact.sum().backward()
        lowp = call(ref, x.clone())
        assert out.dtype == torch.float32 and leaf.grad.dtype == dtype
        assert_within_ref_error(out, lowp, exact, name=f"{name} value")
        torch.testing.assert_close(leaf.grad.double(), exact_leaf.grad, atol=1e-4 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-3 if dtype == torch.float32 else 2e-2)


def test_group_advantages_hand_computed():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])  # groups [1, 2, 3] (mean 2, std 1) and [4, 4, 4]
    eps = 1e-6
    expected = {
        "grpo": torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0]),
        "dr_grpo": torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
        "rloo": torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0, 0.0, 0.0]),  # s_i - mean of the other two
    }
    for mode, want in expected.items():
        out = rlhf_fast.group_advantages(scores, 3, mode=mode)
        assert out.dtype == torch.float32 and out.shape == scores.shape
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(rlhf_fast.group_advantages(scores.view(2, 3), 3, mode=mode), want.view(2, 3))
    torch.testing.assert_close(rlhf_fast.group_advantages(scores, 3, mode="grpo", eps=1.0),
                               torch.tensor([-0.5, 0.0, 0.5, 0.0, 0.0, 0.0]))
    assert (rlhf_fast.group_advantages(scores, 3) == rlhf_fast.group_advantages(scores, 3, mode="grpo")).all()


def test_group_advantages_by_id_hand_computed():
    """Unequal groups, shuffled rows, arbitrary ids, a singleton: group 5 = [1, 3] (mean 2, std sqrt 2),
    group -2 = [0, 4, 8] (mean 4, std 4), group 9 = [7] alone."""
    scores = torch.tensor([4.0, 1.0, 7.0, 0.0, 3.0, 8.0])
    ids = torch.tensor([-2, 5, 9, -2, 5, -2])
    eps = 1e-6
    r2 = 2 ** 0.5
    expected = {
        "grpo": torch.tensor([0.0, -1 / (r2 + eps), 0.0, -4 / (4 + eps), 1 / (r2 + eps), 4 / (4 + eps)]),
        "dr_grpo": torch.tensor([0.0, -1.0, 0.0, -4.0, 1.0, 4.0]),
        "rloo": torch.tensor([4 - 4.0, 1 - 3.0, 0.0, 0 - 6.0, 3 - 1.0, 8 - 2.0]),  # s_i - mean of the others
    }
    for mode, want in expected.items():
        out = rlhf_fast.group_advantages(scores, ids, mode=mode)
        assert out.dtype == torch.float32 and out.shape == scores.shape
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(A.group_advantages_ref(scores, ids, mode), want)
        perm = torch.tensor([3, 0, 5, 2, 1, 4])  # the same groups in another row order
        torch.testing.assert_close(rlhf_fast.group_advantages(scores[perm], ids[perm], mode=mode), want[perm])
        # the consecutive layout of an int group size = the same ids spelled out
        consecutive = torch.arange(6) // 2
        torch.testing.assert_close(rlhf_fast.group_advantages(scores, consecutive, mode=mode),
                                   rlhf_fast.group_advantages(scores, 2, mode=mode))


def test_group_advantages_by_id_match_reference():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(40, generator=gen)
    ids = torch.randint(0, 9, (40,), generator=gen) * 7 - 20  # unequal groups, some possibly singletons
    for mode in A.GROUP_MODES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = scores.to(dtype)
            exact = A.group_advantages_ref(x.double(), ids, mode)
            assert_within_ref_error(rlhf_fast.group_advantages(x, ids, mode=mode), A.group_advantages_ref(x, ids, mode),
                                    exact, name=f"{mode} {dtype}")


def test_group_advantages_degenerate_groups_give_zero_not_nan():
    for mode in A.GROUP_MODES:
        assert (rlhf_fast.group_advantages(torch.tensor([0.3, -2.0, 7.0]), 1, mode=mode) == 0).all()
        singletons = rlhf_fast.group_advantages(torch.tensor([0.3, -2.0, 7.0]), torch.tensor([4, 0, 2]), mode=mode)
        assert (singletons == 0).all()
        for dtype in (torch.float32, torch.bfloat16):
            same = torch.full((8,), 0.1, dtype=dtype)  # 0.1 is not representable: equal scores must still give 0
            assert (rlhf_fast.group_advantages(same, 4, mode=mode) == 0).all()
    gen = torch.Generator().manual_seed(9)
    scores = torch.randn(5, 8, generator=gen).bfloat16()
    exact = A.group_advantages_ref(scores.double(), 8, "grpo")
    assert_within_ref_error(rlhf_fast.group_advantages(scores, 8, mode="grpo"),
                            A.group_advantages_ref(scores, 8, "grpo"), exact, name="grpo bf16")


# ---------------------------------------------------------------------------------------------------------------
# Custom-op checks, torch.compile, bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck_scans(device, backend):
    rewards, values, mask = make_inputs(3, 10, "holes", seed=10, device=device)
    gamma = torch.tensor([0.9, 1.0, 0.5], device=device)
    torch.library.opcheck(A.gae_op, (rewards.bfloat16(), values.bfloat16(), mask, gamma, None, 0.0, 0.95, backend))
    torch.library.opcheck(A.discounted_returns_op, (rewards, mask, None, 0.9, backend))


def test_opcheck_statistics_and_groups():
    x = torch.randn(4, 6, requires_grad=True)
    mask = torch.rand(4, 6) < 0.5
    torch.library.opcheck(A.masked_mean_op, (x, mask, 1))
    torch.library.opcheck(A.masked_var_op, (x, mask, True))
    torch.library.opcheck(A.masked_whiten_op, (x, mask, False, 1e-8))
    torch.library.opcheck(A.group_advantages_op, (torch.randn(12).bfloat16(), torch.arange(12) % 5, "grpo", 1e-6))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    rewards, values, mask = make_inputs(3, 12, "holes", seed=11, device=device)
    gamma = torch.tensor([0.9, 1.0, 0.5], device=device)
    scores = torch.randn(12, device=device)

    def step(rewards, values, mask, gamma, scores):
        adv, ret = rlhf_fast.gae(rewards, values, mask, gamma=gamma, lam=0.95)
        adv2, _ = rlhf_fast.gae(rewards, values, mask, gamma=0.99, lam=0.9)
        white = rlhf_fast.masked_whiten(adv + adv2, mask)
        disc = rlhf_fast.discounted_returns(rewards, mask, gamma=0.9)
        stats = rlhf_fast.masked_mean(ret, mask) + rlhf_fast.masked_var(disc, mask)
        group = rlhf_fast.group_advantages(scores, 4, mode="grpo") + rlhf_fast.group_advantages(
            scores, torch.arange(12, device=scores.device) % 5, mode="rloo")
        return white, stats + rlhf_fast.masked_mean(disc, mask, dim=1), group

    torch._dynamo.reset()
    with rlhf_fast.use_backend(backend):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(rewards, values, mask, gamma, scores)
        eager = step(rewards, values, mask, gamma, scores)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)


def test_masked_statistics_compile_with_gradients():
    x = torch.randn(3, 7, requires_grad=True)
    mask = torch.rand(3, 7) < 0.6

    def loss(x):
        return (rlhf_fast.masked_whiten(x, mask) ** 2).sum() + rlhf_fast.masked_mean(x * x, mask, dim=0).sum() \
            + rlhf_fast.masked_var(x, mask)

    torch._dynamo.reset()
    compiled_grad, = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x), x)
    eager_grad, = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_bad_input_errors_name_the_argument():
    r, v, m = make_inputs(2, 5)
    cases = [
        (lambda: rlhf_fast.gae(r[0], v[0], m[0], gamma=0.9, lam=0.9), ValueError, r"rewards must be 2-D \[B, T\]"),
        (lambda: rlhf_fast.gae(r, v[:, :4], m, gamma=0.9, lam=0.9), ValueError, "values must have shape"),
        (lambda: rlhf_fast.gae(r, v, m[:1], gamma=0.9, lam=0.9), ValueError, "mask must have shape"),
        (lambda: rlhf_fast.gae(r.long(), v, m, gamma=0.9, lam=0.9), TypeError, "rewards must be float32"),
        (lambda: rlhf_fast.gae(r, v.double(), m, gamma=0.9, lam=0.9), TypeError, "values must be float32"),
        (lambda: rlhf_fast.gae(r, v, m.to(torch.complex64), gamma=0.9, lam=0.9), TypeError, "mask must be bool"),
        (lambda: rlhf_fast.gae(r, v, m * 0.5, gamma=0.9, lam=0.9), ValueError, "mask must hold only 0 and 1"),
        (lambda: rlhf_fast.gae(r, v, m.long() * 2, gamma=0.9, lam=0.9), ValueError, "mask must hold only 0 and 1"),
        (lambda: rlhf_fast.gae(r, v.to("meta"), m, gamma=0.9, lam=0.9), ValueError, "values is on meta"),
        (lambda: rlhf_fast.gae(r, v, [[1]], gamma=0.9, lam=0.9), TypeError, "mask must be a torch.Tensor"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=1.5, lam=0.9), ValueError, r"gamma must be in \[0, 1\], got 1.5"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=0.9, lam=-0.1), ValueError, r"lam must be in \[0, 1\]"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=float("nan"), lam=0.9), ValueError, "gamma must be in"),
        (lambda: rlhf_fast.gae(r, v, m, gamma="0.9", lam=0.9), TypeError, "gamma must be a Python number"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=True, lam=0.9), TypeError, "gamma must be a Python number"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=0.9, lam=torch.tensor([0.5, 1.2])), ValueError,
         r"lam must be in \[0, 1\], got lam\[1\] = 1.2"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=torch.tensor([0.5]), lam=0.9), ValueError,
         r"gamma as a tensor must have shape \[B\] = \(2,\)"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=torch.tensor([1, 1]), lam=0.9), TypeError, "gamma must be a float"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=torch.ones(2, device="meta"), lam=0.9), ValueError, "gamma is on meta"),
        (lambda: rlhf_fast.gae(r, v, m, gamma=0.9), TypeError, "lam"),
        (lambda: rlhf_fast.discounted_returns(r, m, gamma=2), ValueError, "gamma must be in"),
        (lambda: rlhf_fast.discounted_returns(r, m.T, gamma=0.9), ValueError, "mask must have shape"),
        (lambda: rlhf_fast.discounted_returns(r.int(), m, gamma=0.9), TypeError, "rewards must be float32"),
        (lambda: rlhf_fast.masked_mean(r, m, dim=2), ValueError, "dim must be in"),
        (lambda: rlhf_fast.masked_mean(r, m[0]), ValueError, "mask must have shape"),
        (lambda: rlhf_fast.masked_var(r.long(), m), TypeError, "x must be float32"),
        (lambda: rlhf_fast.masked_whiten(r, m, eps=0.0), ValueError, "eps must be a finite number > 0"),
        (lambda: rlhf_fast.group_advantages(torch.randn(7), 2, mode="grpo"), ValueError,
         "7 entries, not a multiple of group size 2"),
        (lambda: rlhf_fast.group_advantages(torch.randn(3, 4), 2, mode="grpo"), ValueError, "group size = 2"),
        (lambda: rlhf_fast.group_advantages(torch.randn(2, 2, 2), 2, mode="grpo"), ValueError, r"must be \[B\]"),
        (lambda: rlhf_fast.group_advantages(torch.randn(4), 0, mode="grpo"), ValueError, "must be >= 1"),
        (lambda: rlhf_fast.group_advantages(torch.randn(4), 2.0, mode="grpo"), TypeError, "group_ids must be"),
        (lambda: rlhf_fast.group_advantages(torch.randn(4), torch.zeros(4, dtype=torch.int32)), TypeError,
         "group_ids must be int64"),
        (lambda: rlhf_fast.group_advantages(torch.randn(4), torch.zeros(3).long()), ValueError,
         "group_ids must have shape"),
        (lambda: rlhf_fast.group_advantages(torch.randn(2, 2), torch.zeros(4).long()), ValueError, r"must be \[B\]"),
        (lambda: rlhf_fast.group_advantages(torch.randn(4), 2, mode="ppo"), ValueError, "mode must be one of"),
        (lambda: rlhf_fast.group_advantages(torch.arange(4), 2, mode="rloo"), TypeError, "scores must be float32"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_backend_table_and_exports():
    assert set(A.OP_BACKENDS) <= set(rlhf_fast.ops.OP_BACKENDS)
    for name in A.OP_BACKENDS:
        assert name in rlhf_fast.__all__ and callable(getattr(rlhf_fast, name))
    cpu = torch.device("cpu")
    assert _backend.select("gae", A.SCAN_BACKENDS, cpu) == ("cpp" if _backend.built("cpp") else "torch")
