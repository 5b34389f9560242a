"""A small character-level transformer language model on the Python standard library's source.

The text is a fixed list of the standard library's own ``.py`` files (:data:`STDLIB_FILES`),
read from this interpreter's installation, so every machine has it without a download (its
exact content follows the Python version; :func:`load_corpus` records which files and how
many characters). The last :data:`VAL_FRACTION` of every file is held out for validation.

Like :mod:`adopt.demo.digits`, the seeds are trained together: every weight has a leading
``[seeds]`` dimension, the layers are batched matrix products and the loss is the sum of the
per-seed losses, so one run is exactly ``seeds`` independent trainings (own initialisation,
own batches; both shared across optimizer settings for a paired comparison).

:func:`train_charlm` takes the optimizer's keyword arguments and the parameter dtype, so
another comparison (e.g. of optimizer-state formats) can reuse it as it is.
"""

from __future__ import annotations

import math
import platform
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer

from adopt import ADOPT

# Plain-text modules that exist in every CPython 3.9+ installation, in this order.
STDLIB_FILES = (
    "textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py", "glob.py",
    "difflib.py", "argparse.py", "csv.py", "dataclasses.py", "functools.py",
)
VAL_FRACTION = 0.1
VOCAB = 128  # ASCII; any other character is read as "?"


@dataclass(frozen=True)
class CharLMConfig:
    """Model and training sizes (the defaults take seconds per hundred steps on one core)."""

    context: int = 32
    width: int = 64
    heads: int = 4
    layers: int = 2
    batch_size: int = 16
    eval_windows: int = 128  # fixed windows of each split for the reported losses


@dataclass(frozen=True)
class Corpus:
    """The encoded text (int64 character codes) and where it came from."""

    train: Tensor
    val: Tensor
    files: tuple[str, ...]
    characters: int
    python: str


def load_corpus(files: tuple[str, ...] = STDLIB_FILES) -> Corpus:
    """Read ``files`` from the standard library directory; the last part of each is validation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    total = 0
    for name in files:
        path = stdlib / name
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise RuntimeError(f"the standard library source {path} cannot be read: {error.strerror}") from None
        codes = torch.tensor(list(text.encode("ascii", errors="replace")), dtype=torch.int64).clamp_(max=VOCAB - 1)
        cut = int(len(codes) * (1 - VAL_FRACTION))
        train.append(codes[:cut])
        val.append(codes[cut:])
        total += len(text)
    return Corpus(torch.cat(train), torch.cat(val), tuple(files), total, platform.python_version())


def _shapes(cfg: CharLMConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's per-seed shape, in a fixed order."""
    d = cfg.width
    shapes: dict[str, tuple[int, ...]] = {"embed": (VOCAB, d), "position": (cfg.context, d)}
    for i in range(cfg.layers):
        shapes.update({
            f"{i}.ln1.gain": (1, d), f"{i}.ln1.bias": (1, d), f"{i}.qkv": (d, 3 * d), f"{i}.proj": (d, d),
            f"{i}.ln2.gain": (1, d), f"{i}.ln2.bias": (1, d), f"{i}.fc1": (d, 4 * d), f"{i}.fc2": (4 * d, d),
        })
    shapes.update({"ln.gain": (1, d), "ln.bias": (1, d), "head": (d, VOCAB)})
    return shapes


def init_weights(cfg: CharLMConfig, seeds: int) -> dict[str, Tensor]:
    """float32 weights ``[seeds, *shape]``: embeddings N(0, 1) as ``torch.nn.Embedding``,
    matrices uniform in ±1/sqrt(fan_in) as ``torch.nn.Linear``, layer-norm gains 1, biases 0.
    Seed ``i`` draws from generator seed ``i``."""
    shapes = _shapes(cfg)
    per_seed = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        weights = {}
        for name, shape in shapes.items():
            if name in ("embed", "position"):
                weights[name] = torch.randn(shape, generator=g)
            elif name.endswith("gain"):
                weights[name] = torch.ones(shape)
            elif name.endswith("bias"):
                weights[name] = torch.zeros(shape)
            else:
                weights[name] = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(shape[0])
        per_seed.append(weights)
    return {name: torch.stack([w[name] for w in per_seed]) for name in shapes}


def _norm(x: Tensor, gain: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:]) * gain + bias


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention written out (on the CPU, the fused attention's backward in
    bfloat16 is several times slower than these matrix products at this size)."""
    context = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    future = torch.ones(context, context, dtype=torch.bool, device=q.device).triu_(1)
    return torch.matmul(scores.masked_fill(future, float("-inf")).softmax(dim=-1), v)


def forward(w: dict[str, Tensor], tokens: Tensor, cfg: CharLMConfig) -> Tensor:
    """Logits ``[seeds, batch * context, VOCAB]`` of tokens ``[seeds, batch, context]``."""
    seeds, batch, context = tokens.shape
    d, heads = cfg.width, cfg.heads
    rows = torch.arange(seeds, device=tokens.device)[:, None, None]
    x = (w["embed"][rows, tokens] + w["position"][:, None, :context]).reshape(seeds, batch * context, d)
    for i in range(cfg.layers):
        h = _norm(x, w[f"{i}.ln1.gain"], w[f"{i}.ln1.bias"])
        q, k, v = torch.bmm(h, w[f"{i}.qkv"]).view(seeds * batch, context, 3, heads, d // heads).unbind(2)
        a = _causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + torch.bmm(a.transpose(1, 2).reshape(seeds, batch * context, d), w[f"{i}.proj"])
        h = _norm(x, w[f"{i}.ln2.gain"], w[f"{i}.ln2.bias"])
        x = x + torch.bmm(F.gelu(torch.bmm(h, w[f"{i}.fc1"])), w[f"{i}.fc2"])
    return torch.bmm(_norm(x, w["ln.gain"], w["ln.bias"]), w["head"])


def losses(w: dict[str, Tensor], windows: Tensor, cfg: CharLMConfig) -> Tensor:
    """Mean next-character cross-entropy (nats) per seed, ``[seeds]``, of windows
    ``[seeds, batch, context + 1]``, computed in float32."""
    logits = forward(w, windows[..., :-1], cfg).float()
    seeds = logits.shape[0]
    targets = windows[..., 1:].reshape(seeds, -1)
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
    return per_token.view(seeds, -1).mean(dim=1)


def _windows(text: Tensor, starts: Tensor, length: int) -> Tensor:
    return text[starts[..., None] + torch.arange(length)]


def _eval_starts(text: Tensor, cfg: CharLMConfig) -> Tensor:
    """Evenly spaced window starts covering the split."""
    span = len(text) - cfg.context - 1
    return torch.linspace(0, span, cfg.eval_windows).long()


def batch_starts(corpus: Corpus, cfg: CharLMConfig, seeds: int, steps: int) -> Tensor:
    """Training window starts ``[steps, seeds, batch]``; seed ``i`` uses generator 10_000 + i."""
    span = len(corpus.train) - cfg.context - 1
    per_seed = [
        torch.randint(span, (steps, cfg.batch_size), generator=torch.Generator().manual_seed(10_000 + s))
        for s in range(seeds)
    ]
    return torch.stack(per_seed, dim=1)


def train_charlm(
    optimizer_kwargs: Mapping[str, Any],
    dtype: torch.dtype,
    steps: int,
    seeds: int,
    corpus: Corpus,
    cfg: CharLMConfig = CharLMConfig(),
    device: torch.device = torch.device("cpu"),
    evaluations: int = 10,
    progress: Optional[Callable[[int], Any]] = None,
    optimizer_class: Callable[..., Optimizer] = ADOPT,
) -> dict[str, Any]:
    """Train ``seeds`` models with ``optimizer_class(params, **optimizer_kwargs)`` (default
    ``ADOPT``) and parameters stored in ``dtype`` (no float32 copy: forward, backward and
    update all use ``dtype``).

    The reported losses are always computed in float32 from the stored weights, on fixed
    windows of each split, at ``evaluations + 1`` evenly spaced steps (0 = initialisation).
    ``progress(n)`` is called after every ``n`` steps. Returns a JSON-ready dict: ``steps``,
    ``train_loss`` and ``val_loss`` (``[seeds][evaluations + 1]``), and the final ones.
    """
    weights = [w.to(device, dtype).requires_grad_(True) for w in init_weights(cfg, seeds).values()]
    names = list(_shapes(cfg))
    optimizer = optimizer_class(weights, **optimizer_kwargs)
    starts = batch_starts(corpus, cfg, seeds, steps)
    train_text, val_text = corpus.train.to(device), corpus.val.to(device)
    splits = {
        "train": _windows(train_text, _eval_starts(corpus.train, cfg).to(device), cfg.context + 1),
        "val": _windows(val_text, _eval_starts(corpus.val, cfg).to(device), cfg.context + 1),
    }
    checkpoints = sorted({round(steps * k / evaluations) for k in range(evaluations + 1)})
    curves: dict[str, list[Tensor]] = {"train": [], "val": []}

    def evaluate() -> None:
        with torch.no_grad():
            as_float = {n: w.float() for n, w in zip(names, weights)}
            for split, windows in splits.items():
                curves[split].append(losses(as_float, windows.expand(seeds, -1, -1), cfg))

    evaluate()
    done = 0
    for step in range(1, steps + 1):
        batch = _windows(train_text, starts[step - 1].to(device), cfg.context + 1)
        optimizer.zero_grad(set_to_none=True)
        losses(dict(zip(names, weights)), batch, cfg).sum().backward()
        optimizer.step()
        if step in checkpoints:
            evaluate()
            if progress is not None:
                progress(step - done)
            done = step
    train = torch.stack(curves["train"], dim=1).double().cpu()  # [seeds, checkpoints]
    val = torch.stack(curves["val"], dim=1).double().cpu()
    return {
        "steps": checkpoints,
        "train_loss": train.tolist(),
        "val_loss": val.tolist(),
        "final_train_loss": train[:, -1].tolist(),
        "final_val_loss": val[:, -1].tolist(),
    }


def describe(corpus: Corpus, cfg: CharLMConfig) -> dict[str, Any]:
    """The data and model, for the JSON output."""
    n_params = sum(math.prod(s) for s in _shapes(cfg).values())
    return {
        "data": f"Python {corpus.python} standard library sources (sysconfig stdlib directory)",
        "files": list(corpus.files),
        "characters": corpus.characters,
        "train_characters": len(corpus.train),
        "val_characters": len(corpus.val),
        "split": f"the last {VAL_FRACTION:.0%} of every file is validation",
        "vocab": f"{VOCAB} (ASCII; other characters as '?')",
        "model": f"decoder-only transformer, {cfg.layers} layers, width {cfg.width}, {cfg.heads} heads,"
        f" context {cfg.context}, pre-norm, GELU MLP, {n_params} parameters",
        **asdict(cfg),
    }
