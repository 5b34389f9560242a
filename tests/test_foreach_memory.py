"""The foreach path: its temporaries stay within the model's size, and it matches the
single-tensor path bit for bit in every floating dtype (float16 and bfloat16 included), also
when its groups run in chunks with tensors cut into slices."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adopt._foreach as foreach_mod
from adopt import ADOPT, PowerClip
from helpers import make_problem, run_adopt

# --------------------------------------------------------------------------------------------
# Bit-exact agreement with the single-tensor path
# --------------------------------------------------------------------------------------------

STEPS = 6
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DECAYS = {"none": (0.0, False), "l2": (0.1, False), "decoupled": (0.1, True)}
# "default": groups this small are one chunk; "tiny": every group runs in chunks of a few
# elements, so tensors are cut into flat slices and per-tensor values follow the slices.
CHUNKING = {"default": foreach_mod._MIN_CHUNK, "tiny": 1}


def _run(init, grads, monkeypatch, min_chunk, **kw):
    monkeypatch.setattr(foreach_mod, "_MIN_CHUNK", min_chunk)
    return run_adopt(init, grads, **kw)[1]


def _assert_bit_equal(ref_opt, got_opt):
    for i, (a, b) in enumerate(zip(ref_opt.param_groups[0]["params"], got_opt.param_groups[0]["params"])):
        assert torch.equal(a.detach(), b.detach()), f"param {i}: max diff {(a.double() - b.double()).abs().max()}"
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key].cpu(), sb[key].cpu()), f"param {i} {key}"


def _kw(dtype, beta2, decay, maximize, clip, capturable, lr=0.1):
    wd, decouple = DECAYS[decay]
    if capturable and lr == "tensor":
        lr = torch.tensor(0.1, dtype=torch.float64)
    return dict(lr=lr, betas=(0.9, beta2), eps=1e-6, weight_decay=wd, decouple=decouple, maximize=maximize,
                clip_lambda=PowerClip(0.25) if clip else None, capturable=capturable)


GRID = list(itertools.product(DTYPES, [0.5, 0.999, 0.9999], DECAYS, [False, True], [False, True]))


@pytest.mark.parametrize("chunking", CHUNKING)
@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize("dtype,beta2,decay,maximize,clip", GRID)
def test_foreach_bit_equal_to_single(monkeypatch, dtype, beta2, decay, maximize, clip, capturable, chunking):
    """Uneven steps: tensor #1 joins late and #2 skips every third step (see helpers)."""
    init, grads = make_problem(STEPS, dtype=dtype, seed=5)
    kw = _kw(dtype, beta2, decay, maximize, clip, capturable)
    ref = _run(init, grads, monkeypatch, foreach_mod._MIN_CHUNK, foreach=False, **kw)
    got = _run(init, grads, monkeypatch, CHUNKING[chunking], foreach=True, **kw)
    _assert_bit_equal(ref, got)


@pytest.mark.parametrize("chunking", CHUNKING)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", DECAYS)
def test_capturable_tensor_lr_bit_equal(monkeypatch, dtype, decay, chunking):
    init, grads = make_problem(STEPS, dtype=dtype, seed=6)
    kw = _kw(dtype, 0.999, decay, True, True, True, lr="tensor")
    ref = _run(init, grads, monkeypatch, foreach_mod._MIN_CHUNK, foreach=False, **kw)
    got = _run(init, grads, monkeypatch, CHUNKING[chunking], foreach=True, **kw)
    _assert_bit_equal(ref, got)


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_bit_equal(monkeypatch, dtype, capturable):
    init, grads = make_problem(STEPS, dtype=dtype, seed=7)
    kw = _kw(dtype, 0.999, "decoupled", True, True, capturable)
    ref = _run(init, grads, monkeypatch, foreach_mod._MIN_CHUNK, foreach=False, **kw)
    got = _run(init, grads, monkeypatch, 1, foreach=True, **kw)
    _assert_bit_equal(ref, got)


@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_contiguous_tensors_are_chunked_whole(monkeypatch, dtype, capturable):
    """A transposed parameter is not sliced; it still gets exactly the single-tensor update."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(6, 5), (4, 7), (9,)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    init[0] = init[0].t()  # (5, 6), non-contiguous
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in init] for _ in range(STEPS)]
    kw = _kw(dtype, 0.5, "l2", True, True, capturable)

    def run(foreach, min_chunk):
        monkeypatch.setattr(foreach_mod, "_MIN_CHUNK", min_chunk)
        params = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in init]
        assert not params[0].is_contiguous()
        opt = ADOPT(params, foreach=foreach, **kw)
        for row in grads:
            for p, g in zip(params, row):
                p.grad = g.clone()
            opt.step()
        return opt

    _assert_bit_equal(run(False, foreach_mod._MIN_CHUNK), run(True, 1))


@pytest.mark.parametrize("ratio", [1, 2, 3, 4])
@pytest.mark.parametrize("sizes", [[5, 12, 2, 7], [100], [1, 1, 1], [3, 40, 3, 0, 9]])
def test_chunks_cover_the_lists_in_order(monkeypatch, sizes, ratio):
    monkeypatch.setattr(foreach_mod, "_MIN_CHUNK", 1)
    lists = [[torch.arange(n, dtype=torch.float32) + 1000 * k + 100 * i for i, n in enumerate(sizes)] for k in range(3)]
    chunks = foreach_mod._chunks(lists, ratio)
    total = sum(sizes)
    limit = -(-total // ratio)
    for k in range(3):
        joined = torch.cat([t.reshape(-1) for chunk, _ in chunks for t in chunk[k]])
        assert torch.equal(joined, torch.cat(lists[k]))
    for chunk, idx in chunks:
        if idx is None:
            assert len(chunks) == 1 and total <= limit
            continue
        assert sum(t.numel() for t in chunk[0]) <= limit
        for k in range(3):
            assert len(chunk[k]) == len(idx)
            for t, i in zip(chunk[k], idx):
                assert t.untyped_storage().data_ptr() == lists[k][i].untyped_storage().data_ptr()  # views


# --------------------------------------------------------------------------------------------
# Temporaries of one step
# --------------------------------------------------------------------------------------------

# Peak resident memory of one step minus the memory after it, in a fresh process. Large
# allocations are served by mmap and returned when freed (MALLOC_MMAP_THRESHOLD_), so the
# resident set holds no freed memory a step could reuse unseen, and what the step frees again
# is exactly its temporaries (state created for tensors taking their first step stays).
_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from adopt import ADOPT

    def rss(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    def temporaries(make, sizes, late):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
        opt = make(params)
        for step in range(2):
            for i, p in enumerate(params):
                p.grad = None if i in late else torch.randn_like(p)
            opt.step()
        for p in params:  # the late ones take their first step now, the others a real update
            p.grad = torch.randn_like(p)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident set
        opt.step()
        peak, after = rss("VmHWM"), rss("VmRSS")  # after: with the state the late ones got
        return (peak - after) / sum(p.numel() * p.element_size() for p in params)

    out = {}
    for name, kind, kw, sizes, late in json.loads(sys.argv[1]):
        if kind == "adamw":
            make = lambda ps: torch.optim.AdamW(ps, foreach=True, **kw)
        else:
            make = lambda ps: ADOPT(ps, foreach=True, **kw)
        out[name] = temporaries(make, sizes, set(late))
    print(json.dumps(out))
    """
)

_M = 8_000_000
_CASES = [
    ("adamw", "adamw", {}, [_M // 4] * 4, []),
    ("default", "adopt", {}, [_M // 4] * 4, []),
    ("l2", "adopt", {"weight_decay": 0.1}, [_M // 4] * 4, []),
    ("l2-maximize", "adopt", {"weight_decay": 0.1, "maximize": True}, [_M // 4] * 4, []),
    ("decoupled-maximize-noclip", "adopt", {"weight_decay": 0.1, "decouple": True, "maximize": True,
                                            "clip_lambda": None}, [_M // 4] * 4, []),
    ("l2-late-joiners", "adopt", {"weight_decay": 0.1}, [_M // 4] * 4, [1, 3]),
    ("one-tensor-l2", "adopt", {"weight_decay": 0.1}, [_M], []),
    ("capturable", "adopt", {"capturable": True}, [_M // 4] * 4, [2]),
    ("capturable-l2-maximize", "adopt", {"capturable": True, "weight_decay": 0.1, "maximize": True},
     [_M // 4] * 4, [2]),
]
# Page rounding and the small per-step tensors (steps, thresholds, masks).
_SLACK = 0.03


@pytest.fixture(scope="module")
def temporaries() -> dict[str, float]:
    if not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(_CASES)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_measurement_sees_adamw_temporaries(temporaries):
    """The method is sound: AdamW(foreach=True) allocates one model-sized list of temporaries."""
    assert 0.9 <= temporaries["adamw"] <= 1.0 + _SLACK


@pytest.mark.parametrize("case", [c[0] for c in _CASES if c[1] == "adopt"])
def test_foreach_temporaries_within_model_size(temporaries, case):
    assert temporaries[case] <= 1.0 + _SLACK, f"{case}: {temporaries[case]:.3f}x the model size"
