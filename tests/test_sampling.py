"""rlhf_fast.sample: every backend against the exact truncated distribution (chi-square over >= 1e5 seeded draws, made
in one batched call of identical rows), invariants over many random rows, agreement between backends for the same
uniforms, the kept threshold (= the reference's, and {v : logits_v >= it} is the kept set, ties included),
reproducibility, strided inputs, bad input, opcheck and torch.compile. Tests take (device, backend): the CUDA
ones run where a GPU is (benchmarks/gpu_check.sh) and are skipped here."""

import math

import pytest
import torch
from _testing import assert_within_ref_error, compiles_for_hopper, device_backends

import rlhf_fast
from rlhf_fast.ops import sampling as S

BACKENDS = device_backends(S.SAMPLE_BACKENDS)
FAST_BACKENDS = device_backends(("cpp", "triton", "cuda"))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def backends(*names, cpu_slow=True):
    """(device, backend) params of the given backends; cpu_slow=False leaves out the reference (a sort) and the Triton
    interpreter on CPU, too slow for the larger statistical cases."""
    return [p for p in device_backends(names) if cpu_slow or not slow(*p.values)]


def slow(device, backend) -> bool:
    return device == "cpu" and backend in ("torch", "triton")


def draws_for(device, backend) -> int:
    """The Triton interpreter is slow: 2000 draws there (the chi-square bound adapts to the count), 1e5 elsewhere."""
    return 2000 if (device, backend) == ("cpu", "triton") else 100_000


def per_group_draws(device, backend) -> int:
    """Draws per parameter group of the per-row test: 25000 on the kernels; fewer on the (slow) sort-based reference
    and the Triton interpreter on CPU."""
    return {"triton": 500, "torch": 10_000}.get(backend, 25_000) if device == "cpu" else 25_000


def to_device(x, device):
    """x on `device`; rows expanded from one row (stride 0) stay an expanded view."""
    if not isinstance(x, torch.Tensor) or x.device.type == device:
        return x
    if x.dim() == 2 and x.stride(0) == 0:
        return x[0].to(device)[None].expand(x.shape)
    return x.to(device)


def run(device, backend, logits, seed=0, threshold=False, **params):
    """rlhf_fast.sample on `device` with `backend` (inputs moved there) -> (tokens, logp, filtered_logp) on CPU, then
    kept_threshold when `threshold`."""
    logits = to_device(logits, device)
    params = {name: to_device(value, device) for name, value in params.items()}
    with rlhf_fast.use_backend(backend):
        gen = torch.Generator(device=device).manual_seed(seed)
        out = rlhf_fast.sample(logits, generator=gen, return_filtered_logprobs=True, return_kept_threshold=threshold,
                               **params)
    return tuple(o.cpu() for o in out)


def exact_probs(row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The truncated, renormalised distribution of docs/formulas.md in float64 (from the reference's kept set)."""
    p = torch.softmax(row.double() / temperature, dim=-1)[None]
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    keep = S.kept_mask_ref(p, torch.tensor([top_k]), f64(top_p), f64(min_p))[0]
    q = torch.where(keep, p[0], 0.0)
    return q / q.sum()


def chi2_critical(df: int, z: float = 4.753) -> float:
    """Upper quantile of chi-square(df) at alpha = 1e-6 (z: the normal quantile), Wilson-Hilferty approximation."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def assert_distribution(tokens, probs, name):
    """tokens int64 [n] drawn from probs float64 [V]: no draw outside the support, and a chi-square test (cells with
    an expected count >= 5, the rest pooled) at alpha = 1e-6; the draws are seeded, so the outcome is fixed."""
    n, V = tokens.numel(), probs.numel()
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V, f"{name}: token id out of [0, {V})"
    counts = torch.bincount(tokens, minlength=V).double()
    outside = (probs == 0) & (counts > 0)
    assert not outside.any(), f"{name}: draws outside the kept set: {outside.nonzero().flatten()[:10].tolist()}"
    expected = probs * n
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if (~big & (probs > 0)).any():
        obs = torch.cat([obs, counts[~big].sum()[None]])
        exp = torch.cat([exp, expected[~big].sum()[None]])
    df = obs.numel() - 1
    if df == 0:
        return
    stat = float(((obs - exp) ** 2 / exp).sum())
    tv = 0.5 * float((counts / n - probs).abs().sum())
    assert stat < chi2_critical(df), f"{name}: chi-square {stat:.1f} >= {chi2_critical(df):.1f} (df {df}, TV {tv:.4f})"


def logits_111(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(111, generator=gen) * 2.0


def test_chi_square_check_detects_a_wrong_distribution():
    # draws from top-k = 5 judged against top-k = 6 (the sixth token never appears) and with a wrong temperature
    row = logits_111()
    tokens = torch.multinomial(exact_probs(row, top_k=5).float(), 100_000, replacement=True,
                               generator=torch.Generator().manual_seed(0))
    assert_distribution(tokens, exact_probs(row, top_k=5), "self")
    with pytest.raises(AssertionError, match="chi-square"):
        assert_distribution(tokens, exact_probs(row, top_k=6), "top-6")
    with pytest.raises(AssertionError, match="chi-square"):  # a temperature off by 5 %
        assert_distribution(tokens, exact_probs(row, temperature=1.05, top_k=5), "T=1.05")


# (parameters, also on the slow CPU backends?): the reference (a sort of [1e5, 111]) and the Triton interpreter run some
# of the cases on CPU, every other (device, backend) all of them
CASES_111 = [
    (dict(top_k=10), False),
    (dict(top_p=0.7), False),
    (dict(min_p=0.1), False),
    (dict(top_k=20, top_p=0.8, min_p=0.05), True),
    (dict(temperature=0.5, top_p=0.9), False),
    (dict(temperature=5.0), True),  # large: close to uniform
    (dict(temperature=0.05), False),  # near 0: almost a point mass, still exact
]


def v111_params():
    return [pytest.param(*p.values, params, marks=p.marks, id=f"{p.id}-{params}")
            for params, on_slow in CASES_111 for p in backends(*S.SAMPLE_BACKENDS, cpu_slow=on_slow)]


@pytest.mark.parametrize("device,backend,params", v111_params())
def test_distribution_v111(device, backend, params):
    row = logits_111()
    n = draws_for(device, backend)
    tokens, logp, _ = run(device, backend, row[None].expand(n, -1), **params)
    assert_distribution(tokens, exact_probs(row, **params), f"{backend} {params}")
    lp_exact = torch.log_softmax(row.double() / params.get("temperature", 1.0), -1)[tokens]
    assert torch.allclose(logp.double(), lp_exact, atol=1e-5)


def test_kept_set_of_the_reference_by_hand():
    # probabilities 4, 3, 3, 1, 1 twelfths; each threshold placed strictly inside an interval, away from rounding
    p = torch.tensor([[4.0, 3.0, 3.0, 1.0, 1.0]], dtype=torch.float64) / 12.0
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        return S.kept_mask_ref(p, torch.tensor([top_k]), f64(top_p), f64(min_p))[0].int().tolist()

    assert kept() == [1, 1, 1, 1, 1]
    assert kept(top_k=1) == [1, 0, 0, 0, 0]
    assert kept(top_k=2) == [1, 1, 1, 0, 0]  # the 2nd value is tied: both 3s kept
    assert kept(top_p=3.9 / 12) == [1, 0, 0, 0, 0]  # the max alone reaches it
    assert kept(top_p=5 / 12) == [1, 1, 1, 0, 0]  # reached inside the tie of 3s: the whole tie is kept
    assert kept(top_p=10.5 / 12) == [1, 1, 1, 1, 1]  # 10/12 < 10.5/12: the tied 1s are needed
    assert kept(top_k=3, top_p=0.5) == [1, 1, 1, 0, 0]  # 0.5 of the top-3 mass (10/12): 4/10 < 0.5 <= 7/10
    assert kept(top_k=3, top_p=0.39) == [1, 0, 0, 0, 0]  # renormalised: 4/10 reaches 0.39
    assert kept(min_p=0.74) == [1, 1, 1, 0, 0]  # p >= 0.74 * 4/12 keeps the 3/12s
    assert kept(min_p=0.76) == [1, 0, 0, 0, 0]
    assert kept(top_p=10.5 / 12, min_p=0.5) == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("device,backend", backends("cpp", "triton", "cuda"))
def test_distribution_ties_at_the_thresholds(device, backend):
    # logits 4, then three tied 3s, then two tied 2s, then lower ones
    row = torch.cat([torch.tensor([1.0, 3.0, 2.0, 4.0, 3.0, 2.0, 3.0]), torch.linspace(-3.0, 0.0, 40)])
    p = torch.softmax(row.double(), -1)
    n = draws_for(device, backend)
    cases = [
        dict(top_k=2),  # the k-th value is tied: all three 3s kept (4 tokens)
        dict(top_p=float(p[3] + 0.5 * p[1])),  # the mass is reached inside the tie of 3s: all kept
        dict(top_k=6, top_p=0.999),  # top-k keeps the 3s and both 2s; top-p on the renormalised 6
    ]
    for params in cases[2:] if backend == "triton" else cases:
        tokens, _, _ = run(device, backend, row[None].expand(n, -1), **params)
        probs = exact_probs(row, **params)
        assert int((probs > 0).sum()) in (4, 6)
        assert_distribution(tokens, probs, f"{backend} ties {params}")


@pytest.mark.parametrize("device,backend", backends("cpp", "triton", "cuda"))
def test_distribution_v2(device, backend):
    row = torch.tensor([0.3, -0.2])
    n = draws_for(device, backend)
    for params in (dict(), dict(temperature=0.3), dict(top_p=0.5), dict(top_k=1), dict(min_p=0.7)):
        tokens, _, _ = run(device, backend, row[None].expand(n, -1), **params)
        assert_distribution(tokens, exact_probs(row, **params), f"{backend} V=2 {params}")


@pytest.mark.parametrize("device,backend", backends("cpp", "triton", "cuda", cpu_slow=False))
def test_distribution_v32000(device, backend):
    # 1e5 draws of one 32000-token row per case (the rows are an expanded view: no copy); the torch reference would
    # need a [1e5, 32000] tensor and the Triton interpreter is too slow at this size
    row = torch.randn(32000, generator=torch.Generator().manual_seed(3)) * 3.0
    params = dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01)
    tokens, logp, _ = run(device, backend, row[None].expand(100_000, -1), **params)
    assert_distribution(tokens, exact_probs(row, **params), f"{backend} V=32000 {params}")
    lp_exact = torch.log_softmax(row.double() / params["temperature"], -1)[tokens]
    assert torch.allclose(logp.double(), lp_exact, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_distribution_per_row_parameters(device, backend):
    # four groups of rows, interleaved, each with its own parameters; group 2 is greedy
    groups = [dict(temperature=0.7, top_k=5, top_p=1.0, min_p=0.0),
              dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0),
              dict(temperature=0.0, top_k=3, top_p=0.5, min_p=0.0),
              dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)]
    n = 4 * per_group_draws(device, backend)
    which = torch.arange(n) % 4
    params = {name: torch.tensor([g[name] for g in groups])[which] for name in groups[0]}
    row = logits_111(seed=1)
    tokens, logp, flogp = run(device, backend, row[None].expand(n, -1), **params)
    for i, g in enumerate(groups):
        sel = which == i
        if g["temperature"] == 0:
            assert (tokens[sel] == row.argmax()).all() and (logp[sel] == 0).all() and (flogp[sel] == 0).all()
        else:
            assert_distribution(tokens[sel], exact_probs(row, **g), f"{backend} group {i} {g}")


def random_rows(B, V, dtype, seed):
    """Random logits (a few -inf entries) and random per-row parameters, some rows greedy and some unfiltered."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=gen) * torch.rand(B, 1, generator=gen).mul(4).add(0.2)
    logits[torch.rand(B, V, generator=gen) < 0.05] = float("-inf")
    logits[:, 0] = torch.randn(B, generator=gen)  # every row keeps a finite value
    r = lambda: torch.rand(B, generator=gen)  # noqa: E731
    params = dict(
        temperature=torch.where(r() < 0.1, 0.0, r() * 1.7 + 0.3),
        top_k=torch.where(r() < 0.5, torch.randint(1, 60, (B,), generator=gen), 0),
        top_p=torch.where(r() < 0.5, r() * 0.7 + 0.3, 1.0),
        min_p=torch.where(r() < 0.3, r() * 0.3, 0.0),
    )
    return logits.to(dtype), params


def reference_kept(logits, params):
    """The reference's kept set (bool [B, V]) and the float32 probabilities it is taken from, as sample_ref computes
    them (greedy rows: of the temperature-1 softmax, unused)."""
    t = params["temperature"]
    t = torch.where(t > 0, t, 1.0)
    probs = torch.log_softmax(logits.float() / t[:, None], -1).exp()
    return S.kept_mask_ref(probs, params["top_k"], params["top_p"], params["min_p"]), probs


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_invariants_random_rows(device, backend, dtype):
    B, V = {"triton": (200, 100), "torch": (500, 500)}.get(backend, (1000, 1000)) if device == "cpu" else (4000, 1000)
    logits, params = random_rows(B, V, dtype, seed=7)
    tokens, logp, flogp = run(device, backend, logits, seed=1, **params)
    assert tokens.dtype == torch.int64 and logp.dtype == flogp.dtype == torch.float32
    assert ((tokens >= 0) & (tokens < V)).all()
    greedy = params["temperature"] == 0
    assert torch.equal(tokens[greedy], logits[greedy].float().argmax(-1))
    assert (logp[greedy] == 0).all() and (flogp[greedy] == 0).all()

    s = ~greedy
    x, tok = logits[s].double(), tokens[s]
    t = params["temperature"][s].double()[:, None]
    logp_exact = torch.log_softmax(x / t, -1)
    p = logp_exact.exp()
    picked = lambda a: a.gather(1, tok[:, None]).squeeze(1)  # noqa: E731
    assert (picked(p) > 0).all(), "a token of zero probability was drawn"
    k, top_p, min_p = params["top_k"][s], params["top_p"][s].double(), params["min_p"][s].double()
    kept = S.kept_mask_ref(p, k, top_p, min_p)
    # the kernels compare float32 sums: allow a token the exact (float64) thresholds cut by a hair
    loose = S.kept_mask_ref(p, k, (top_p * (1 + 1e-5)).clamp(max=1.0), min_p * (1 - 1e-5))
    assert picked(loose).all(), "a token outside the kept set was drawn"
    # log-probs: the tolerance rule against the same formula in float32 (logits as given, in float32)
    lp32 = torch.log_softmax(logits[s].float() / params["temperature"][s][:, None], -1)
    assert_within_ref_error(logp[s], picked(lp32), picked(logp_exact), name=f"{backend} {dtype} logprobs")
    flp_exact = picked(logp_exact) - torch.where(kept, p, 0.0).sum(-1).log()
    same = picked(kept) & (kept == loose).all(-1)
    assert torch.allclose(flogp[s][same].double(), flp_exact[same], atol=2e-5)


@pytest.mark.parametrize("device,backend", FAST_BACKENDS)
def test_backends_agree_for_the_same_uniforms(device, backend):
    B, V = (200, 100) if slow(device, backend) else (2000, 700)
    logits, params = random_rows(B, V, torch.float32, seed=11)
    ref = run(device, "torch", logits, seed=5, threshold=True, **params)
    out = run(device, backend, logits, seed=5, threshold=True, **params)
    # equal except where u falls within float rounding of a boundary between two tokens (never seen at these sizes)
    assert (out[0] == ref[0]).float().mean() >= 0.999
    same = out[0] == ref[0]
    assert torch.allclose(out[1][same], ref[1][same], atol=1e-5)
    assert torch.allclose(out[2][same], ref[2][same], atol=1e-5)
    # the kept thresholds are equal, except on rows where the reference keeps tokens of probability < FLT_MIN (a
    # top-k whose k-th value underflows; these rows have some): the kernels' exp gives those e = 0 and they drop them
    keep, probs = reference_kept(logits, params)
    tiny = (keep & (probs < 1.2e-38)).any(-1)
    assert torch.equal(out[3][~tiny], ref[3][~tiny])
    sampled = (params["temperature"] > 0) & S.filter_active(V, params["top_k"], params["top_p"], params["min_p"])
    ge = logits.float()[sampled] >= out[3][sampled, None]
    keep, probs = keep[sampled], probs[sampled]
    assert tiny.any() and not (ge & ~keep).any() and (probs[keep & ~ge] < 1.2e-38).all()


def threshold_rows(B, V, dtype, seed, grid=None):
    """Logits of a moderate range (no probability underflows to 0 in float32 at the temperatures drawn) and random
    per-row mixes of top-k / top-p / min-p; about 1/8 of the rows greedy, 1/8 unfiltered. grid: logits rounded to its
    multiples, so that most thresholds fall inside a tie."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=gen) * torch.rand(B, 1, generator=gen).mul(2).add(0.5)
    if grid is not None:
        logits = (logits / grid).round() * grid
    r = lambda: torch.rand(B, generator=gen)  # noqa: E731
    kind = torch.randint(0, 8, (B,), generator=gen)  # 0: greedy, 1: no filter, else a random mix
    mixed = kind >= 2
    params = dict(
        temperature=torch.where(kind == 0, 0.0, r() + 0.5),
        top_k=torch.where(mixed & (r() < 0.6), torch.randint(1, V, (B,), generator=gen), 0),
        top_p=torch.where(mixed & (r() < 0.6), r() * 0.9 + 0.05, 1.0),
        min_p=torch.where(mixed & (r() < 0.4), r() * 0.5, 0.0),
    )
    return logits.to(dtype), params


THRESHOLD_CASES = [(torch.float32, None), (torch.float32, 0.5), (torch.bfloat16, None), (torch.float16, 0.25)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,grid", THRESHOLD_CASES, ids=[f"{str(d)[6:]}-grid{g}" for d, g in THRESHOLD_CASES])
def test_kept_threshold_is_the_kept_set(device, backend, dtype, grid):
    B, V = (96, 100) if slow(device, backend) else (1000, 300)
    logits, params = threshold_rows(B, V, dtype, seed=21, grid=grid)
    tokens, _, flogp, m = run(device, backend, logits, seed=2, threshold=True, **params)
    assert m.dtype == torch.float32 and m.shape == (B,)
    x = logits.float()
    greedy = params["temperature"] == 0
    active = S.filter_active(V, params["top_k"], params["top_p"], params["min_p"]) & ~greedy
    margin = S.threshold_with_margin  # the midpoint below the smallest kept logit (kept set unchanged)
    assert torch.equal(m[greedy], margin(x[greedy], x[greedy].max(-1).values))  # greedy: below the max logit
    assert (m[~greedy & ~active] == float("-inf")).all()  # no filter: everything kept
    assert active.sum() > B // 2

    # the reference's kept set, and whether a filter's bound lies within float32 rounding of a row's value (there the
    # kernels' own float32 sums may decide either way; every other row must match exactly)
    keep, probs = reference_kept(logits, params)
    k, top_p, min_p = params["top_k"], params["top_p"], params["min_p"]
    loose = S.kept_mask_ref(probs, k, (top_p * (1 + 2e-6)).clamp(max=1.0), min_p * (1 - 2e-6))
    tight = S.kept_mask_ref(probs, k, top_p * (1 - 2e-6), min_p * (1 + 2e-6))
    exact = active & (loose == tight).all(-1)
    assert exact.sum() >= 0.95 * active.sum()
    min_kept = torch.where(keep, x, float("inf")).amin(-1)
    assert torch.equal(m[exact], margin(x[exact], min_kept[exact]))  # just below the min raw logit of the kept set
    assert torch.equal(x[exact] >= m[exact, None], keep[exact])  # and exactly the kept set, ties included
    if backend == "torch":
        assert torch.equal(m[active], margin(x[active], min_kept[active]))

    # the backend's own kept set is {x >= m}: every draw is in it, and its mass renormalises filtered_logprobs
    s = ~greedy
    ins = x[s] >= m[s, None]
    assert ins.gather(1, tokens[s, None]).all()
    z = x[s].double() / params["temperature"][s].double()[:, None]
    flp = z.gather(1, tokens[s, None]).squeeze(1) - torch.where(ins, z, float("-inf")).logsumexp(-1)
    assert torch.allclose(flogp[s].double(), flp, atol=2e-5, rtol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kept_threshold_ties_by_hand(device, backend, dtype):
    # logits 4, three tied 3s, two tied 2s, three 1s, a 0: every filter's boundary below falls inside a tie
    row = torch.tensor([1.0, 3.0, 2.0, 4.0, 3.0, 2.0, 3.0, 1.0, 0.0, 1.0])
    p, p7 = torch.softmax(row.double(), -1), torch.softmax(row.double() / 0.7, -1)
    two_max = row.clone()
    two_max[8] = 4.0
    cases = [  # (row, temperature, top_k, top_p, min_p) -> threshold (midway to the largest dropped logit)
        (row, 1.0, 2, 1.0, 0.0, 2.5),  # k-th value tied: all three 3s
        (row, 1.0, 4, 1.0, 0.0, 2.5),  # k = 4 = the max and the 3s
        (row, 1.0, 5, 1.0, 0.0, 1.5),  # the 5th is a 2: both 2s
        (row, 1.0, 0, float(p[3] + 0.5 * p[1]), 0.0, 2.5),  # the top-p mass is reached inside the 3s
        (row, 0.7, 0, float(p7[3] + 0.5 * p7[1]), 0.0, 2.5),  # ... at T = 0.7
        (row, 1.0, 0, float(p[3] + 3 * p[1] + 0.5 * p[2]), 0.0, 1.5),  # ... inside the 2s
        (row, 1.0, 5, 0.99, 0.0, 1.5),  # top-k keeps 6 (the tie of 2s), top-p of those needs the 2s
        (row, 1.0, 0, 1.0, math.exp(-1.5), 2.5),  # min-p: p >= e^-1.5 max p keeps the 3s (e^-1), not the 2s (e^-2)
        (row, 0.5, 0, 1.0, math.exp(-2.5), 2.5),  # at T = 0.5: 3s at e^-2, 2s at e^-4
        (row, 1.0, 1, 1.0, 0.0, 3.5),  # only the max
        (two_max, 1.0, 1, 1.0, 0.0, 3.5),  # a tied max: both kept
        (row, 1.0, 10, 1.0, 0.0, float("-inf")),  # top_k = V: off
        (row, 1.0, 0, 1.0, 0.0, float("-inf")),  # no filter
        (two_max, 0.0, 3, 0.5, 0.1, 3.5),  # greedy: the max logit and its ties, whatever the filters
    ]
    logits = torch.stack([c[0] for c in cases]).to(dtype)
    params = {name: torch.tensor([c[i] for c in cases]) for i, name in
              enumerate(("temperature", "top_k", "top_p", "min_p"), start=1)}
    tokens, _, _, m = run(device, backend, logits, seed=3, threshold=True, **params)
    assert m.tolist() == [c[5] for c in cases]
    keep, _ = reference_kept(logits, params)
    filtered = torch.isfinite(m) & (params["temperature"] > 0)
    assert torch.equal(logits.float()[filtered] >= m[filtered, None], keep[filtered])
    assert (logits.float().gather(1, tokens[:, None]).squeeze(1) >= m).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kept_threshold_when_top_k_underflows(device, backend):
    # the 3rd largest probability is exp(-200) = 0 in float32, so the reference's top-k keeps every p >= 0 (its
    # threshold is the min logit, -300); the kernels draw from e > 0 only (threshold midway from -1 to -200); both
    # sets have the same mass
    logits = torch.tensor([[0.0, -1.0, -200.0, -300.0, -200.0]])
    tokens, _, flogp, m = run(device, backend, logits, threshold=True, top_k=3)
    assert m.item() == (-300.0 if backend == "torch" else -100.5)
    assert tokens.item() in (0, 1)
    expect = torch.tensor([0.0, -1.0], dtype=torch.float64).log_softmax(-1)[tokens]
    assert torch.allclose(flogp.double(), expect, atol=1e-6, rtol=0)


def test_sample_return_order():
    x = torch.randn(6, 30, generator=torch.Generator().manual_seed(0))
    kw = dict(top_k=5, top_p=0.9)
    outs = {}
    for flp in (False, True):
        for thr in (False, True):
            gen = torch.Generator().manual_seed(1)
            outs[flp, thr] = rlhf_fast.sample(x, generator=gen, return_filtered_logprobs=flp,
                                              return_kept_threshold=thr, **kw)
    full = outs[True, True]
    assert len(outs[False, False]) == 2 and len(outs[True, False]) == 3 and len(outs[False, True]) == 3
    assert len(full) == 4
    for (flp, thr), out in outs.items():
        assert torch.equal(out[0], full[0]) and torch.equal(out[1], full[1])
        extra = [full[2]] * flp + [full[3]] * thr
        assert all(torch.equal(o, e) for o, e in zip(out[2:], extra))
    assert (full[3] > float("-inf")).all() and not torch.equal(full[2], full[3])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_greedy_ties_lowest_id_and_mixed_rows(device, backend):
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0, 5.0, 5.0, 5.0], [-1.0, 0.0, 3.0, 3.0]])
    tokens, logp, flogp = run(device, backend, logits, temperature=0.0)
    assert tokens.tolist() == [1, 0, 2]
    assert logp.tolist() == [0.0, 0.0, 0.0] and flogp.tolist() == [0.0, 0.0, 0.0]
    # a near-zero temperature splits the tie evenly; a mixed batch keeps each row's rule
    tokens, _, _ = run(device, backend, logits[2:].expand(2000, -1), temperature=torch.tensor([1e-4, 0.0]).repeat(1000))
    assert (tokens[1::2] == 2).all()
    assert set(tokens[0::2].tolist()) == {2, 3} and abs((tokens[0::2] == 2).float().mean() - 0.5) < 0.06


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_small_and_empty(device, backend):
    tokens, logp, flogp = run(device, backend, torch.randn(3, 1), top_k=1, top_p=0.5)
    assert tokens.tolist() == [0, 0, 0] and logp.abs().max() < 1e-6 and flogp.abs().max() < 1e-6
    tokens, logp, flogp = run(device, backend, torch.randn(0, 5), top_p=0.5)
    assert tokens.shape == logp.shape == flogp.shape == (0,)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_reproducible_and_seed_dependent(device, backend):
    logits = torch.randn(400, 50, generator=torch.Generator().manual_seed(0)) * 2
    a = run(device, backend, logits, seed=3, top_p=0.9)
    b = run(device, backend, logits, seed=3, top_p=0.9)
    c = run(device, backend, logits, seed=4, top_p=0.9)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert (a[0] != c[0]).float().mean() > 0.3


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_and_expanded_inputs(device, backend):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 200, generator=gen).to(device)
    expect = run(device, backend, base, seed=9, top_k=40, top_p=0.9)
    wide = torch.randn(6, 220, generator=gen).to(device)
    wide[:, :200] = base
    transposed = base.t().contiguous().t()  # stride (1, 6): not unit stride in V
    for name, x in (("row-strided", wide[:, :200]), ("transposed", transposed)):
        out = run(device, backend, x, seed=9, top_k=40, top_p=0.9)
        assert all(torch.equal(o, e) for o, e in zip(out, expect)), name
    one = run(device, backend, base[:1].expand(6, -1), seed=9, top_k=40, top_p=0.9)
    copy = run(device, backend, base[:1].repeat(6, 1), seed=9, top_k=40, top_p=0.9)
    assert all(torch.equal(o, e) for o, e in zip(one, copy)), "expanded rows (stride 0)"


def test_bad_input():
    x = torch.randn(4, 10)
    for value, match in ((0.0, "top_p"), (1.5, "top_p"), (float("nan"), "top_p"), (-0.1, "top_p")):
        with pytest.raises(ValueError, match=match):
            rlhf_fast.sample(x, top_p=value)
    with pytest.raises(ValueError, match="top_k"):
        rlhf_fast.sample(x, top_k=-1)
    with pytest.raises(TypeError, match="top_k"):
        rlhf_fast.sample(x, top_k=2.5)
    for value in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            rlhf_fast.sample(x, temperature=value)
    for value in (-0.1, 1.5):
        with pytest.raises(ValueError, match="min_p"):
            rlhf_fast.sample(x, min_p=value)
    with pytest.raises(ValueError, match=r"top_p must have shape \(4,\)"):
        rlhf_fast.sample(x, top_p=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"temperature must have shape \(4,\)"):
        rlhf_fast.sample(x, temperature=torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"top_p\[2\]"):
        rlhf_fast.sample(x, top_p=torch.tensor([0.5, 1.0, 0.0, 0.9]))
    with pytest.raises(ValueError, match=r"top_k\[1\]"):
        rlhf_fast.sample(x, top_k=torch.tensor([1, -2, 0, 3]))
    with pytest.raises(ValueError, match=r"temperature\[3\]"):
        rlhf_fast.sample(x, temperature=torch.tensor([1.0, 0.0, 2.0, -1.0]))
    with pytest.raises(TypeError, match="top_k"):
        rlhf_fast.sample(x, top_k=torch.ones(4))
    with pytest.raises(TypeError, match="top_p"):
        rlhf_fast.sample(x, top_p=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="min_p is on meta"):
        rlhf_fast.sample(x, min_p=torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="2-D"):
        rlhf_fast.sample(torch.randn(2, 3, 10))
    with pytest.raises(TypeError, match="logits"):
        rlhf_fast.sample(torch.ones(4, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="generator"):
        rlhf_fast.sample(x, generator=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_and_infinite_logits(device, backend):
    # CPU: a clear error naming the row. CUDA: no check (it would synchronise): a NaN log-prob and an id in [0, V).
    rows = torch.randn(3, 4, 10)
    rows[0, 2, 7] = float("nan")
    rows[1, 2, 7] = float("inf")
    rows[2, 2] = float("-inf")
    for x in rows:
        for temperature in (1.0, 0.0):
            if device == "cpu":
                with rlhf_fast.use_backend(backend), pytest.raises(ValueError, match=r"logits\[2\] contains NaN"):
                    rlhf_fast.sample(x, temperature=temperature, top_k=3)
            else:
                tokens, logp, flogp = run(device, backend, x, temperature=temperature, top_k=3)
                assert logp[2].isnan() and flogp[2].isnan() and 0 <= int(tokens[2]) < 10
                assert not logp[[0, 1, 3]].isnan().any()


def op_args(device, backend, B=5, V=50):
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(B, V, generator=gen), torch.rand(B, generator=gen), torch.tensor([1.0, 0.0, 0.7, 2.0, 1.0]),
            torch.tensor([0, 3, 10, 0, 5]), torch.tensor([1.0, 0.5, 0.9, 0.8, 1.0]),
            torch.tensor([0.0, 0.0, 0.1, 0.0, 0.3]))
    return (*(a.to(device) for a in args), backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    torch.library.opcheck(S.sample_op, op_args(device, backend))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    def fn(logits):
        return rlhf_fast.sample(logits, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, return_filtered_logprobs=True,
                                return_kept_threshold=True)

    logits = torch.randn(16, 80, generator=torch.Generator().manual_seed(0)).to(device)
    with rlhf_fast.use_backend(backend):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        torch.manual_seed(0)
        out = compiled(logits)
        torch.manual_seed(0)
        expect = fn(logits)
    assert all(torch.equal(o, e) for o, e in zip(out, expect))



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_torch_compile_fullgraph_with_a_generator(device):
    """A compiled decode step can take a generator (issue 19: dynamo has no proxy for a torch.Generator, so
    ``torch.rand(generator=g)`` inside ``sample`` was a graph break). Two steps per call and two calls: every draw is
    the eager one for the same generator state, the generator advances, and a second generator gives its own draws."""
    def step(logits, generator):
        first = rlhf_fast.sample(logits, temperature=0.8, top_p=0.9, generator=generator)
        return first, rlhf_fast.sample(logits, temperature=0.8, top_p=0.9, generator=generator)

    logits = torch.randn(16, 80, generator=torch.Generator().manual_seed(0)).to(device)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in (1, 2):  # a second generator object: a new graph, its own draws
        g_compiled = torch.Generator(device=device).manual_seed(seed)
        g_eager = torch.Generator(device=device).manual_seed(seed)
        for _ in range(2):
            got, expect = compiled(logits, g_compiled), step(logits, g_eager)
            for o, e in zip((*got[0], *got[1]), (*expect[0], *expect[1])):
                assert torch.equal(o, e)
        assert torch.equal(g_compiled.get_state(), g_eager.get_state())
    assert not torch.equal(got[0][0], got[1][0])  # the two draws of a step differ (not merged into one)


def test_uniforms_op_opcheck():
    """The uniforms op behind a generator under torch.compile: schema and fake tensor (it is random, so the checks
    that compare two runs do not apply)."""
    key = S._generator_key(torch.Generator().manual_seed(0))
    torch.library.opcheck(S.uniforms_op, (torch.randn(5, 3), key), test_utils=("test_schema", "test_faketensor"))


COMPILE_FOR_HOPPER = """
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlhf_fast.kernels.sampling import N_ITERS, NUM_PIVOTS, _sample_kernel

signature = dict.fromkeys(["logits_ptr"], "*bf16")
signature.update(dict(u_ptr="*fp32", temperature_ptr="*fp32", top_k_ptr="*i64", top_p_ptr="*fp32",
                      min_p_ptr="*fp32", tokens_ptr="*i64", logp_ptr="*fp32", filtered_ptr="*fp32",
                      threshold_ptr="*fp32", B="i32", V="i32", row_stride="i32"))
signature.update(dict.fromkeys(["ROWS", "BLOCK_V", "NP", "N_ITERS"], "constexpr"))
for rows, block_v, warps in [(1, 1024, 8), (8, 128, 4)]:
    constexprs = dict(ROWS=rows, BLOCK_V=block_v, NP=NUM_PIVOTS, N_ITERS=N_ITERS)
    kernel = compile(ASTSource(fn=_sample_kernel, signature=signature, constexprs=constexprs),
                     target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    assert len(kernel.asm["cubin"]) > 0
print("compiled")
"""


def test_triton_kernel_compiles_for_hopper():
    """The Triton sampler compiled for sm_90 without a GPU: what the interpreter cannot check (globals, types)."""
    compiles_for_hopper(COMPILE_FOR_HOPPER)
