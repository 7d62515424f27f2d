"""rlhf_fast.integrations.trl against the installed trl itself: each replaced function against TRL's, and a tiny
GRPO run that gives the same losses patched and unpatched."""

import sys
import tempfile

import pytest
import torch
from _testing import assert_within_ref_error

trl = pytest.importorskip("trl")
from trl.trainer import utils as trl_utils  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.integrations import trl as rlhf_trl  # noqa: E402

ORIG = {name: getattr(trl_utils, name) for name in rlhf_trl._REPLACEMENTS if hasattr(trl_utils, name)}


@pytest.fixture(autouse=True)
def _always_unpatch():
    yield
    rlhf_trl.unpatch()


def _logits(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=gen)).to(dtype), gen


@pytest.mark.parametrize("k", [None, 1, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_row_mask", [False, True])
def test_selective_log_softmax_matches_trl(k, temperature, with_row_mask):
    logits, gen = _logits((3, 5, 37))
    index_shape = (3, 5) if k is None else (3, 5, k)
    index = torch.randint(0, 37, index_shape, generator=gen)
    row_mask = (torch.rand(index_shape, generator=gen) < 0.7) if with_row_mask else None
    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    out = rlhf_trl.selective_log_softmax(x, index, temperature, row_mask)
    ref = ORIG["selective_log_softmax"](y, index, temperature=temperature, row_mask=row_mask)
    assert out.shape == index.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(index_shape, generator=gen)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), y)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    if with_row_mask:
        assert torch.all(out[row_mask == 0] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_low_precision(dtype):
    logits, gen = _logits((4, 6, 50), dtype)
    index = torch.randint(0, 50, (4, 6), generator=gen)
    exact = ORIG["selective_log_softmax"](logits.double(), index)
    same = ORIG["selective_log_softmax"](logits, index)  # TRL's CPU path: log_softmax in the low dtype
    out = rlhf_trl.selective_log_softmax(logits, index)
    assert out.dtype == dtype == same.dtype  # TRL's dtype contract on its CPU path (math in float32)
    assert_within_ref_error(out.float(), same.float(), exact.float(), name=str(dtype))
    assert rlhf_trl.entropy_from_logits(logits).dtype == dtype
    rlhf_trl.patch(dtype="float32")
    assert rlhf_trl.selective_log_softmax(logits, index).dtype == torch.float32
    rlhf_trl.unpatch()
    assert rlhf_trl.selective_log_softmax(logits, index).dtype == dtype


def test_entropy_and_joint_match_trl():
    logits, gen = _logits((2, 7, 33))
    index = torch.randint(0, 33, (2, 7), generator=gen)
    row_mask = torch.rand(2, 7, generator=gen) < 0.6
    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    ent = rlhf_trl.entropy_from_logits(x)
    ent_ref = ORIG["entropy_from_logits"](y, chunk_size=3)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(ent.sum(), x)
    (g_ref,) = torch.autograd.grad(ent_ref.sum(), y)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    if "selective_log_softmax_and_entropy" in ORIG:
        for requires_grad in (True, False):
            got = rlhf_trl.selective_log_softmax_and_entropy(logits, index, requires_grad, 0.8, row_mask)
            want = ORIG["selective_log_softmax_and_entropy"](logits, index, requires_grad, 0.8, row_mask)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiles_fullgraph():
    logits, gen = _logits((2, 3, 11))
    index = torch.randint(0, 11, (2, 3), generator=gen)
    for idx in (index, torch.stack([index, index.flip(-1)], -1)):
        fn = lambda a, b: rlhf_trl.selective_log_softmax(a, b, 0.7)  # noqa: E731
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(logits, idx), fn(logits, idx))


def test_float64_and_bad_temperature_follow_trl():
    logits, gen = _logits((2, 3, 11), torch.float64)
    index = torch.randint(0, 11, (2, 3), generator=gen)
    torch.testing.assert_close(rlhf_trl.selective_log_softmax(logits, index, 0.5),
                               ORIG["selective_log_softmax"](logits, index, 0.5))
    with pytest.raises(ValueError, match="temperature must be positive"):
        rlhf_trl.selective_log_softmax(logits.float(), index, 0.0)


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_lm_head_matches_trl(outputs, with_bias):
    gen = torch.Generator().manual_seed(5)
    n, h, v = 13, 16, 45
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(v, h, generator=gen)).requires_grad_()
    bias = torch.randn(v, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    params = [p for p in (hidden, weight, bias) if p is not None]
    got = rlhf_trl.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 0.7, 8, None, 1.0, outputs)
    want = ORIG["_ChunkedLogProbFunction"].apply(hidden, weight, bias, targets, 0.7, 8, None, 1.0, outputs)
    loss, loss_ref = got[0].sum(), want[0].sum()
    if "entropy" in outputs:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
        loss, loss_ref = loss + 0.3 * got[1].sum(), loss_ref + 0.3 * want[1].sum()
    else:
        assert got[1] is None
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params)):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_chunked_lm_head_falls_back_for_softcapping():
    gen = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(5, 8, generator=gen), torch.randn(21, 8, generator=gen)
    targets = torch.randint(0, 21, (5,), generator=gen)
    got = rlhf_trl.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 8, 5.0, 1.0, ("log_probs",))
    want = ORIG["_ChunkedLogProbFunction"].apply(hidden, weight, None, targets, 1.0, 8, 5.0, 1.0, ("log_probs",))
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_lm_head_every_output_fused(monkeypatch, with_bias):
    """All five outputs on the fused path, checked on full logits z = (h W^T + b) / T: log sum_v p_v^2,
    mean_v z_v, and is_top1 = the target is the FIRST argmax (a tie with an earlier token is not top-1)."""
    calls = []
    real = ops.linear_logprobs
    monkeypatch.setattr(ops, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(7)
    n, h, v, t = 6, 8, 9000, 0.8  # v > one argmax chunk (4096)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen)
    weight[[3, 5, 8000]] = 10 * torch.eye(h)[0]  # rows 0 and 1: exact ties of tokens 3, 5, 8000 at the max (50)
    hidden_det = hidden.detach()
    hidden_det[:2] = 5 * torch.eye(h)[0]
    bias = torch.randn(v, generator=gen) if with_bias else None
    if with_bias:
        bias[8000] = bias[3] = bias[5]
    targets = torch.tensor([3, 5, 1, 2, 3, 4])
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    logp, ent, lssp, mean, top1 = rlhf_trl.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, t, 1024,
                                                                          None, 1.0, outputs)
    assert calls and all(x.dtype == torch.float32 for x in (logp, ent, lssp, mean)) and top1.dtype == torch.bool
    z = ((hidden_det @ weight.T + (0 if bias is None else bias)) / t).double()
    p = z.softmax(-1)
    torch.testing.assert_close(logp.double(), z.log_softmax(-1).gather(-1, targets[:, None])[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ent.double(), -(p * p.log().nan_to_num()).sum(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(lssp.double(), (p * p).sum(-1).log(), atol=1e-4, rtol=0)
    torch.testing.assert_close(mean.double(), z.mean(-1), atol=1e-4, rtol=0)
    assert top1[0] and not top1[1]  # 3 is the first of the tied maxima; 5 comes after 3
    assert torch.equal(top1[2:], z[2:].argmax(-1) == targets[2:])
    assert not lssp.requires_grad and not mean.requires_grad and logp.requires_grad
    want = ORIG["_ChunkedLogProbFunction"].apply(hidden, weight, bias, targets, t, 1024, None, 1.0, outputs)
    assert torch.equal(top1, want[4])
    for a, b in zip((logp, ent, lssp, mean), want[:4]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_patch_unpatch_every_module():
    import trl.trainer.grpo_trainer  # noqa: F401  (a trainer that imports the names)

    with rlhf_trl.patched():
        assert rlhf_trl.is_patched()
        assert trl_utils.selective_log_softmax is rlhf_trl.selective_log_softmax
        assert trl_utils._ChunkedLogProbFunction is rlhf_trl.ChunkedLogProbFunction
        for name, module in list(sys.modules.items()):
            if name.startswith("trl") and module is not None:
                assert not any(value is orig for value in vars(module).values() for orig in ORIG.values()), name
        rlhf_trl.patch()  # idempotent
    assert not rlhf_trl.is_patched()
    for name, orig in ORIG.items():
        assert getattr(trl_utils, name) is orig


def test_unpatch_restores_modules_imported_while_patched():
    """Regression: a trl module imported during the patch takes rlhf_fast's function by name (``from
    ..trainer.utils import selective_log_softmax``); after ``patched()`` it must hold TRL's function again."""
    import types

    with rlhf_trl.patched():
        late = types.ModuleType("trl._imported_while_patched")
        sys.modules[late.__name__] = late
        exec("from trl.trainer.utils import selective_log_softmax, _ChunkedLogProbFunction", late.__dict__)
        assert late.selective_log_softmax is rlhf_trl.selective_log_softmax
    try:
        assert late.selective_log_softmax is ORIG["selective_log_softmax"]
        assert late._ChunkedLogProbFunction is ORIG["_ChunkedLogProbFunction"]
    finally:
        del sys.modules[late.__name__]


# ---- the same tiny GRPO run, patched and unpatched ------------------------------------------------------------------

def _tiny_grpo_run(steps=2):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    words = "a b c d e f g h i j k l m n o p".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    gen = torch.Generator().manual_seed(0)
    prompts = [" ".join(words[j] for j in torch.randint(0, 16, (4,), generator=gen)) for _ in range(16)]

    def reward(completions, **_):
        return [float(c.count("a")) - 0.1 * len(c) for c in completions]

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        # SGD, not Adam: Adam's g / sqrt(v) turns float-rounding noise in near-zero gradients into full-size steps
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                          max_steps=steps, logging_steps=1, learning_rate=0.1, optim="sgd", report_to=[],
                          save_strategy="no",
                          use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, beta=0.0)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                              processing_class=tokenizer)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, [p.detach().clone() for p in model.parameters()]


def test_tiny_grpo_run_same_patched_and_unpatched(monkeypatch):
    calls = []
    real = ops.linear_logprobs
    monkeypatch.setattr(ops, "linear_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    logs, params = _tiny_grpo_run()
    assert not calls
    with rlhf_trl.patched():
        logs_p, params_p = _tiny_grpo_run()
    assert calls, "the patched run never reached rlhf_fast.ops.linear_logprobs"
    assert len(logs) == len(logs_p) == 2
    for a, b in zip(logs, logs_p):
        for key in ("loss", "entropy", "reward"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
        # The GRPO gradient sums -A_t * grad(logp_t) with zero-mean advantages: terms much larger than the result
        # cancel, so fp32 rounding (1e-6 of each term, measured equal for TRL and rlhf_fast against float64) shows
        # as ~1e-4 of the gradient norm.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    for p, q in zip(params, params_p):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)
