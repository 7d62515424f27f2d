"""Packaging behaviour: the package works without its compiled extension, and every benchmark script runs."""

import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = sorted((pathlib.Path(__file__).parent.parent / "benchmarks").glob("bench_*.py"))

WITHOUT_EXTENSION = """
import sys, warnings

class Block:  # make the compiled extensions unimportable, as in an install built with RLHF_FAST_NO_EXTENSIONS=1
    def find_spec(self, name, path=None, target=None):
        if name in ("rlhf_fast._C", "rlhf_fast._C_cuda"):
            raise ImportError(f"blocked {name}")

sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, rlhf_fast
    from rlhf_fast import _backend
assert len([w for w in caught if "compiled C++ extension is not available" in str(w.message)]) == 1, caught
assert not _backend.built("cpp")
x = torch.randn(3, 11, requires_grad=True)
lp = rlhf_fast.logprobs(x, torch.tensor([1, 2, 3]))
lp.sum().backward()
ref = torch.log_softmax(x.detach(), -1)[torch.arange(3), torch.tensor([1, 2, 3])]
torch.testing.assert_close(lp, ref)
with rlhf_fast.use_backend("cpp"):
    try:
        rlhf_fast.logprobs(x, torch.tensor([1, 2, 3]))
        raise AssertionError("expected an error for an unavailable backend")
    except RuntimeError as exc:
        assert "not available in this installation" in str(exc), exc
print("ok")
"""


def test_works_without_compiled_extension_with_one_warning():
    out = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_runs(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # a script imports its sibling common.py
    out = subprocess.run([sys.executable, str(script), "--quick", "--reps", "1", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=script.parent, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "r.json").stat().st_size > 0
