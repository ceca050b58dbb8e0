"""Autoregressive decoding with a preallocated KV cache (the gpt-fast loop).

One cache sized prompt + max_new_tokens is allocated up front; ``prefill`` runs the whole prompt
through it once and ``decode_step`` feeds one token per row, each computing the LM head for the
last position only. The loop keeps tokens on the device: the only host sync per step is the
"every row finished?" check, made only when an EOS id or a stop string is set. Ragged prompts are
left-padded; their padding keys are masked and their RoPE positions follow HF ``generate``
(``cumsum(attention_mask) - 1``, 0 at padding) so greedy output matches HF token for token. A batch
without padding builds no mask and no position tensor at all.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import sysconfig
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..kernels import TORCH_VERSION
from .sampling import (PrefixConstraint, StepRules, callables, check_sampling_args, is_greedy, process_logits,
                       reads_text, sample, token_biases)
from .stops import Criteria, StopStrings, criteria_for, stop_strings_for

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer
    from ..model.cache import KVCache
    from .guidance import Guidance

@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B * num_return, T_prompt + T_new) int64, prompt (padding included) first
    scores: torch.Tensor | None = None  # beam search: final score of each returned sequence (HF's sequences_scores)
    # output_scores: per new token, the processed scores it was chosen from, (rows, V) fp32 (HF's `scores`;
    # rows = the batch, or beam search's B * num_beams running beams)
    step_scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None  # output_logits: per new token, the raw logits (HF's `logits`)
    # beam search with output_scores or output_logits: (B * num_return, T_new) the row of step_scores each
    # token came from, -1 past a hypothesis's end (HF's beam_indices)
    beam_indices: torch.Tensor | None = None


# -- the two forward passes ------------------------------------------------------------------
def prefill(
    model: torch.nn.Module,
    ids: torch.Tensor,
    cache,
    positions: torch.Tensor | None = None,
    pad_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompt ids (B, T) into the empty cache; return the next-token logits (B, V)."""
    return model(ids, positions=positions, cache=cache, pad_mask=pad_mask, logits_to_keep=1)[:, -1]


def prefill_copies(
    model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor | None, pad_mask: torch.Tensor | None,
    copies: int, steps: Steps, total: int,
):
    """Prefill each prompt of ids (B, T) once and copy its keys to ``copies`` rows of a fresh
    ``steps`` cache of ``total`` slots (beam search's beams; sampling's ``num_return_sequences``):
    (cache of B * copies rows, their next-token logits (B * copies, V)); prompt b's rows are
    ``b * copies ...``."""
    B, T = ids.shape
    rows = torch.arange(B, device=ids.device).repeat_interleave(copies)
    prompts = model.setup_cache(B, T)
    logits = prefill(model, ids, prompts, positions, pad_mask)[rows]
    cache = steps.setup_cache(model, B * copies, total)
    cache.copy_rows(prompts, rows)
    return cache, logits


def decode_step(
    model: torch.nn.Module, token: torch.Tensor, cache, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Feed one token per row (B, 1) at the cache's end; return the next-token logits (B, V)."""
    return model(token, positions=positions, cache=cache, logits_to_keep=1)[:, -1]


def static_decode_step(
    model: torch.nn.Module, token: torch.Tensor, cache, positions: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """``decode_step`` on shapes that never change, for CUDA graphs (HF's static cache, gpt-fast):
    the new keys/values go to cache slot(s) ``slots`` (1,) and attention spans the whole cache
    buffer, masked past them. ``positions`` (B|1, 1) are required; ``cache.length`` is left to the
    caller. Same logits as ``decode_step`` up to float rounding."""
    return model(token, positions=positions, cache=cache, cache_slots=slots, logits_to_keep=1)[:, -1]


@functools.cache
def compiled_decode_step(device_type: str = "cpu"):
    """``decode_step`` through ``torch.compile`` (gpt-fast): one graph for every cache length
    (``dynamic=True``), elementwise ops fused around the matmuls. The first call compiles (tens of
    seconds on a CPU); later calls, and later ``generate`` calls, reuse it.

    On a CPU the graph gets inductor's C++ wrapper (``cpp_wrapper``): its many small kernel and
    matmul calls are made from compiled C++ instead of a generated Python function, whose per-call
    cost was about a fifth of a small model's step (docs/benchmarks.md; the first call compiles
    longer). The wrapper is a Python extension, so it needs Python's headers; without them the
    Python wrapper is used."""
    cpp = device_type == "cpu" and Path(sysconfig.get_paths()["include"], "Python.h").is_file()
    return torch.compile(decode_step, dynamic=True, options={"cpp_wrapper": True} if cpp else None)


@functools.cache
def compiled_static_step():
    """``static_decode_step`` through ``torch.compile`` with CUDA graphs (``mode="reduce-overhead"``):
    one graph per batch size and cache size, each step a single graph replay, with no Python and
    no per-kernel launch cost. (On a CPU the mode only compiles.)"""
    return torch.compile(static_decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)


STATIC_CACHE_ROUND = 256  # static caches are sized up to a multiple of this: fewer distinct graphs

# model -> the static cache its last ``generate`` call decoded on, kept for the next call (as HF
# keeps its StaticCache and gpt-fast its caches). Reused, the buffers keep their addresses, so the
# compiled step replays its CUDA graph on them instead of recording a new one for every call (and
# torch 2.4, which guards on their identity, does not recompile). A call takes it out while it
# decodes, so concurrent calls never share one. ``STATIC_CACHES.pop(model, None)`` frees it.
STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Steps:
    """How a decode loop runs its one-token steps, and the cache they need.

    Default: ``decode_step``, eager, on a cache of exactly the tokens needed. ``compile``: through
    ``compiled_decode_step``. ``static``: ``static_decode_step`` (through ``compiled_static_step``
    when compiling) on a cache rounded up to ``STATIC_CACHE_ROUND`` slots, so prompts of similar
    lengths share one graph, and reused across calls (``STATIC_CACHES``; ``close`` gives it
    back); the slot, the positions of an unpadded batch and the cache length are handled here,
    outside the graph."""

    def __init__(self, *, compile: bool = False, static: bool = False):
        self.compile, self.static = compile, static
        self.taken: tuple[torch.nn.Module, KVCache] | None = None  # (model, static cache) to give back

    @classmethod
    def for_device(cls, device: torch.device, *, compile: bool, static: bool | None) -> "Steps":
        """``generate``'s steps: ``static`` None = the static cache when compiling on CUDA (one CUDA
        graph per step), and on torch 2.4, whose dynamic-shape guards fail to evaluate ("name
        'FloatTrueDiv' is not defined"), so the usual cache's compiled step would recompile at every
        new length (about a minute each); its static step compiles once per batch and cache size."""
        if static is None:
            static = compile and (device.type == "cuda" or TORCH_VERSION < (2, 5))
        return cls(compile=compile, static=bool(static))

    def setup_cache(self, model: torch.nn.Module, batch_size: int, total: int):
        if not self.static:
            return model.setup_cache(batch_size, total)
        # rounded up, within the context (never below total: setup_cache reports that)
        room = model.config.max_seq_len - model.virtual_tokens
        total = max(total, min(-(-total // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND, room))
        self.close()
        kept = STATIC_CACHES.pop(model, None)
        try:
            cache = model.setup_cache(batch_size, total, reuse=kept)
        except BaseException:  # refused (or interrupted) before using it: keep it for the next call
            if kept is not None:
                STATIC_CACHES[model] = kept
            raise
        self.taken = (model, cache)
        return cache

    def start(self, model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor | None,
              pad_mask: torch.Tensor | None, total: int, copies: int = 1):
        """Prefill the prompts ids (B, T) into a fresh cache of ``total`` slots, ``copies`` rows per
        prompt (``prefill_copies``): (cache, next-token logits (B * copies, V))."""
        if copies > 1:
            return prefill_copies(model, ids, positions, pad_mask, copies, self, total)
        cache = self.setup_cache(model, ids.shape[0], total)
        return cache, prefill(model, ids, cache, positions, pad_mask)

    def reorder(self, cache, rows: torch.Tensor) -> None:
        """Beam search: cache row i becomes row ``rows[i]``'s."""
        cache.reorder(rows)

    def close(self) -> None:
        """Keep the static cache handed out (if any) for the model's next call."""
        if self.taken is not None:
            model, cache = self.taken
            STATIC_CACHES[model] = cache
            self.taken = None

    def __call__(self, model: torch.nn.Module, token: torch.Tensor, cache, positions: torch.Tensor | None):
        """Feed ``token`` (B, 1) at the cache's end (RoPE ``positions`` (B, 1), or None for the
        default); return the next-token logits (B, V)."""
        if not self.static:
            step = compiled_decode_step(token.device.type) if self.compile else decode_step
            return step(model, token, cache, positions)
        slot = cache.static_slot()
        if positions is None:  # no padding: each row's RoPE position is its slot, less the virtual tokens
            positions = (slot - model.virtual_tokens).view(1, 1)
        if self.compile:
            if token.is_cuda:  # a new step: the last replay's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            logits = compiled_static_step()(model, token, cache, positions, slot)
        else:
            logits = static_decode_step(model, token, cache, positions, slot)
        cache.advance(token.shape[1])
        return logits


CPU_LAYOUT_MAX_BYTES = 1 << 30  # linear weights up to this size get the decode layout's copies
FEW_ROWS = 16  # up to this many rows (batch * new positions), the CPU decode layout's transposed product
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}  # method: its linears


def decode_product(
    x: torch.Tensor, weight: torch.Tensor, decode_weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``linear(x, weight, bias)`` computed the way MKL runs fastest for the rows of ``x`` (equal up
    to float rounding): one row on ``decode_weight`` (``weight`` or its (in, out)-contiguous copy),
    up to ``FEW_ROWS`` as ``(W @ x^T)^T``, more (a prefill) as usual."""
    rows = x.numel() // x.shape[-1]
    if rows == 1:  # a matrix-vector product
        return torch.nn.functional.linear(x, decode_weight, bias)
    if rows > FEW_ROWS or x.dtype != torch.float32:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()  # (W @ x^T)^T: (rows, out), column-major
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


def decode_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` while ``cpu_decode_layout`` is on (``decode_product``)."""
    return decode_product(x, self.weight, self.decode_weight, self.bias)


def decode_fused(self: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``Attention.qkv`` / ``MLP.gate_up`` while ``cpu_decode_layout`` is on: up to ``FEW_ROWS``
    rows, the projections as one product on their concatenated weights, split; a prefill runs
    them one by one, as the model does."""
    if x.numel() // x.shape[-1] > FEW_ROWS:
        return getattr(self.decode_base, self.decode_fused)(self, x)
    return decode_product(x, self.decode_cat_weight, self.decode_weight, self.decode_bias).split(self.decode_sizes, -1)


@functools.cache
def decoding_class(cls: type, name: str) -> type:
    """``cls`` with its method ``name`` (one of ``FUSED``) replaced by ``decode_fused``: the class an
    attention or MLP block takes inside ``cpu_decode_layout``. One per class, so a compiled step
    sees the same type at every call (a method set on the instance would be a new object each
    time, and torch 2.4 recompiles on its identity)."""
    return type(f"Decoding{cls.__name__}", (cls,), {name: decode_fused, "decode_fused": name, "decode_base": cls})


def plain_linear(m: torch.nn.Module) -> bool:
    """An ``nn.Linear`` as the model built it: not a subclass or wrapper, its forward not replaced."""
    return type(m) is torch.nn.Linear and "forward" not in m.__dict__


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same matrix stored (in, out)-contiguous: same values and shape, transposed strides."""
    return w.detach().t().contiguous().t()


def one_row_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight a one-row product uses in ``cpu_decode_layout``: a ``column_major`` copy of an
    fp32 weight with at least as many outputs as inputs, else the weight itself (a
    ``down_proj``-like fp32 weight, and every bf16/fp16 one: there the column-major product falls
    off MKL's fast path, 3x to 60x slower)."""
    return column_major(w) if w.dtype == torch.float32 and w.shape[0] >= w.shape[1] else w.detach()


def dynamo_inlines_modules() -> bool:
    """Whether torch.compile traces modules as plain Python objects (torch >= 2.5), lifting their
    tensors as graph inputs, instead of guarding each by identity (2.4)."""
    import torch._dynamo

    with warnings.catch_warnings():  # newer torch warns that the option is gone (always on)
        warnings.simplefilter("ignore")
        return bool(getattr(torch._dynamo.config, "inline_inbuilt_nn_modules", True))


@contextlib.contextmanager
def cpu_decode_layout(model: torch.nn.Module, *, compiled: bool = False) -> Iterator[None]:
    """On the CPU, give the model the faster matrix products of decoding for one ``generate``.

    A decode step multiplies every weight by a few rows (batch size x 1 new position), streamed
    from memory, and how MKL is asked for that product matters more than the FLOPs:
    - One row is a matrix-vector product. On an fp32 weight with more outputs than inputs it is
      faster with the weight stored (in, out)-contiguous (``column_major``): 1.3x to 2.9x for 320
      to 4096 outputs from 192 inputs. On one with fewer (``down_proj``) that layout is about 1.4x
      slower, so it keeps its own, and so do bf16 and fp16 weights, whose column-major product is
      3x to 60x slower (``one_row_weight``).
    - With 2 to ``FEW_ROWS`` rows, ``(W @ x^T)^T`` on the usual weight is about 2x faster through a
      whole model than ``x @ W^T`` (batch 8).
    - Small weights stream slowly, one call each: q/k/v, and gate/up, are computed as one product
      on their concatenated weights (``Attention.qkv``, ``MLP.gate_up``).
    (Measured on a 2-core AMD EPYC with AVX2, weights cycled from memory; docs/benchmarks.md.)
    Longer inputs (the prompt's prefill) take the model's usual path. Inside this context each
    plain linear layer uses ``decode_linear`` as its forward, and the attention and MLP blocks whose
    projections are all plain take a ``decoding_class`` (``decode_fused``), each holding the
    copies it needs; all of it is undone when the last ``generate`` or stream using it (nested, or
    in another thread) ends. The parameters are never touched, and the copies live only as long as
    the call, which must not change the weights meanwhile (its KV cache would go stale too).
    Models whose linear weights exceed ``CPU_LAYOUT_MAX_BYTES`` get no copies: in fp32 only the
    transposed product of a few rows, which needs none, and 1.9x to 4.1x faster on a 1B model's
    weights (2 to 16 rows, 5632 x 2048 and 32000 x 2048), while at that size the column-major copy
    changes one-row products by 10% either way and the fused products' per-call saving is
    negligible; in bf16 and fp16 nothing. All models are left alone when ``compiled`` on torch 2.4:
    its dynamo does not inline modules and guards their tensors by identity, so the copies made
    anew for each call would recompile the step at every call.
    """
    users = model.__dict__.get("decode_layout_users", 0)  # generate calls inside the layout now
    if compiled and not users and not dynamo_inlines_modules():
        yield
        return
    if not users:
        linears = [m for m in model.modules() if plain_linear(m)]
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        copies = nbytes <= CPU_LAYOUT_MAX_BYTES  # else only the few-row product, in fp32
        w = linears[0].weight if linears else None
        if w is None or w.device.type != "cpu" or not (copies or w.dtype == torch.float32):
            yield
            return
    model.decode_layout_users = users + 1
    try:
        if not users:  # the first user lays the model out; nested or concurrent calls share it
            patched, fused = [], set()  # (module, attributes set on it, its class); ids of fused linears
            with torch.no_grad():
                for m in model.modules() if copies else ():
                    name = next((n for n in FUSED if hasattr(m, n)), None)
                    parts = [getattr(m, p, None) for p in FUSED.get(name, ())]
                    if not parts or not all(plain_linear(p) for p in parts):
                        continue
                    if len({p.bias is None for p in parts}) > 1:
                        continue
                    m.decode_cat_weight = torch.cat([p.weight.detach() for p in parts])  # (sum of outs, in)
                    m.decode_weight = one_row_weight(m.decode_cat_weight)
                    m.decode_bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
                    m.decode_sizes = tuple(p.out_features for p in parts)
                    patched.append((m, ("decode_cat_weight", "decode_weight", "decode_bias", "decode_sizes"), type(m)))
                    m.__class__ = decoding_class(type(m), name)
                    fused.update(id(p) for p in parts)
                for m in (m for m in linears if id(m) not in fused):  # a fused one runs only in prefills
                    m.decode_weight = one_row_weight(m.weight) if copies else m.weight.detach()
                    m.forward = decode_linear.__get__(m)
                    patched.append((m, ("decode_weight", "forward"), type(m)))
            model.decode_layout_patched = patched
        yield
    finally:
        model.decode_layout_users -= 1
        if not model.decode_layout_users:  # the last user out, whichever it is, takes the layout down
            del model.decode_layout_users
            for m, names, cls in model.__dict__.pop("decode_layout_patched", ()):
                m.__class__ = cls
                for n in names:
                    m.__dict__.pop(n, None)


# -- inputs -------------------------------------------------------------------------------------
def left_pad(prompts: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> ids (B, T) left-padded with ``pad_value`` and mask (B, T), False at padding."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_value, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, T - len(p) :] = True
    return ids, mask


def padded_positions(pad_mask: torch.Tensor) -> torch.Tensor:
    """HF's position ids for a padded batch: count of real tokens so far - 1, 0 at padding. (B, T)"""
    return (pad_mask.long().cumsum(-1) - 1).masked_fill(~pad_mask, 0)


def is_int(x) -> bool:
    """An integer (Python's or numpy's) and not a bool: what a token id, a count or a seed must be."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def refuse_text(input_ids) -> None:
    if isinstance(input_ids, (str, bytes)):
        raise ValueError("input_ids is text; encode it into token ids first (tok.encode(text)) and pass those")


def prepare_inputs(
    input_ids, attention_mask: torch.Tensor | None, pad_value: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt(s) -> ids (B, T) on ``device`` and pad_mask (B, T) bool, or None when nothing is padded."""
    refuse_text(input_ids)
    if type(input_ids).__module__ == "numpy":  # an array (a tokenizer's return_tensors="np") is a tensor
        input_ids = torch.as_tensor(input_ids)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids (1 = token, 0 = padding), got "
                         f"{type(attention_mask).__name__}; pass a list of ragged prompts without a mask instead")
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        not_ids = ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool
        if ids.dim() != 2 or (not_ids and ids.numel()):  # (an empty one is refused as empty, below)
            raise ValueError(
                f"input_ids must be integer token ids shaped (batch, seq_len); "
                f"got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        mask = None
        if attention_mask is not None:
            mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
            mask = mask.to(device=device, dtype=torch.bool)
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask applies to a padded tensor; ragged lists are padded here, pass no mask")
        prompts = list(input_ids)
        if not prompts:
            raise ValueError("input_ids is an empty batch; pass at least one prompt")
        flat = isinstance(prompts[0], numbers.Integral)  # one prompt
        prompts = [prompts] if flat else [list(p) for p in prompts]
        for p in prompts:
            bad = next((t for t in p if not is_int(t)), None)
            if bad is not None:
                raise ValueError(f"input_ids must hold integer token ids; found {bad!r} ({type(bad).__name__})")
        ids, mask = left_pad(prompts, pad_value)
        mask = mask.to(device)
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(ids.shape)}; pass at least one token per prompt")
    ids = ids.to(device=device, dtype=torch.long)
    if mask is not None:
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"empty prompt: row(s) {empty.nonzero().flatten().tolist()} have no tokens")
        if not bool(mask[:, -1].all()):
            raise ValueError("attention_mask shows right padding; left-pad the prompts (padding first, as HF expects)")
        if bool(mask.all()):
            mask = None  # nothing padded: no mask, no positions, the fast path
    return ids, mask


def as_id_list(token_ids: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    """An id, a sequence of ids, a numpy integer or array, or a tensor (0-d or 1-d) -> list of ids."""
    if token_ids is None:
        return []
    if hasattr(token_ids, "tolist"):  # tensors and numpy values: .tolist() gives an int or a list of ints
        token_ids = token_ids.tolist()
    ids = [token_ids] if isinstance(token_ids, numbers.Integral) else token_ids
    if not isinstance(ids, (list, tuple)) or not all(map(is_int, ids)):
        raise ValueError(f"eos_token_id={token_ids!r} must be a token id or a list of them")
    return [int(t) for t in ids]


DEFAULT_NEW_TOKENS = 64  # when neither max_new_tokens nor max_length is given


def check_max_time(max_time: float | None) -> None:
    if max_time is not None and (not isinstance(max_time, numbers.Real) or isinstance(max_time, bool)
                                 or not 0 <= max_time < float("inf")):
        raise ValueError(f"max_time={max_time!r} must be a number of seconds >= 0 (or None: no limit)")


def deadline_after(max_time: float | None) -> float | None:
    """HF's ``max_time``: the ``time.monotonic()`` reading after which decoding stops (None: never)."""
    check_max_time(max_time)
    return None if max_time is None else time.monotonic() + float(max_time)


def out_of_time(deadline: float | None) -> bool:
    """Whether the step just made ends decoding: its tokens are kept, as HF's MaxTimeCriteria does."""
    return deadline is not None and time.monotonic() > deadline


def check_length(model: torch.nn.Module, prompt_len: int, max_new_tokens: int | None,
                 max_length: int | None = None, *, what: str = "prompt") -> int:
    """The number of new tokens to allow (checked against the model's context): ``max_new_tokens``,
    else ``max_length`` less the (padded) prompt length, HF's total-length cap, else 64. ``what``
    names the context in the error (guidance's "negative prompt")."""
    if max_new_tokens is None and max_length is not None:
        if not is_int(max_length):
            raise ValueError(f"max_length={max_length!r} must be an integer (the prompt's tokens and the new ones)")
        if max_length <= prompt_len:
            raise ValueError(f"max_length={max_length} counts the prompt's {prompt_len} tokens too (as HF's), so it "
                             f"leaves no room for new ones; raise it or pass max_new_tokens")
        max_new_tokens = max_length - prompt_len
    elif max_new_tokens is None:
        max_new_tokens = DEFAULT_NEW_TOKENS
    if not is_int(max_new_tokens):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    virtual = getattr(model, "virtual_tokens", 0)  # a prefix's or prompt's learned positions come first
    limit = model.config.max_seq_len - virtual
    if prompt_len + max_new_tokens > limit:
        context = (f"of {limit} (max_seq_len={model.config.max_seq_len} less {virtual} virtual tokens)" if virtual
                   else f"max_seq_len={limit}")
        raise ValueError(
            f"{what} of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model context {context}; shorten the {what} or lower max_new_tokens"
        )
    return int(max_new_tokens)


# generate's and generate_stream's keywords that process the logits (HF's logits processors)
PROCESSING_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
    "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "min_length", "sequence_bias", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "forced_eos_token_id", "exponential_decay_length_penalty", "renormalize_logits",
    "logits_processor", "prefix_allowed_tokens_fn",
)


def processing(
    model: torch.nn.Module, eos: list[int], prompt_len: int, max_new_tokens: int, *, min_new_tokens: int | None,
    min_length: int | None, sequence_bias, bad_words_ids, suppress_tokens, begin_suppress_tokens,
    forced_eos_token_id, exponential_decay_length_penalty, logits_processor=None, prefix_allowed_tokens_fn=None,
    group: int = 1, **processors,
) -> tuple[dict, StepRules]:
    """``generate``'s logits-processing keywords as ``process_logits``' keywords (``processors``, the
    sequence biases compiled into ``bias``, ``prefix_allowed_tokens_fn`` as ``allowed`` with
    ``group`` rows per prompt, ``logits_processor`` as ``custom``) and the rules of each step
    (``StepRules``: EOS held back until ``min_new_tokens``, or ``min_length`` less the padded
    prompt, are out; the begin tokens banned at the first step; the forced EOS at the last; the EOS
    boost)."""
    device = next(model.parameters()).device
    processors["bias"] = token_biases(sequence_bias=sequence_bias, bad_words_ids=bad_words_ids,
                                      suppress_tokens=suppress_tokens, eos=eos, vocab_size=model.config.vocab_size,
                                      device=device)
    if prefix_allowed_tokens_fn is not None:
        processors["allowed"] = PrefixConstraint(prefix_allowed_tokens_fn, group)
    if logits_processor is not None:
        processors["custom"] = callables(logits_processor, "logits_processor",
                                         "(input_ids, scores) -> scores, such as HF LogitsProcessor objects")
    processors["renormalize_logits"] = bool(processors.get("renormalize_logits"))
    min_new = max(min_new_tokens or 0, (min_length or 0) - prompt_len, 0)
    return processors, StepRules(eos, min_new, begin_suppress_tokens, forced_eos_token_id, max_new_tokens - 1,
                                 exponential_decay_length_penalty)


def check_ids(model: torch.nn.Module, ids: torch.Tensor, pad_mask: torch.Tensor | None) -> None:
    """Prompt ids must be vocabulary ids, or the placeholders -1 ... -n of a soft prompt placed in the
    text (``Transformer.soft_tokens``, ``lmstack.peft.soft_prompt_ids``)."""
    real = ids if pad_mask is None else ids.masked_fill(~pad_mask, 0)
    vocab = model.config.vocab_size
    if pad_mask is not None:  # padding is still embedded (then masked): an id outside the table fails there
        padding = ids.masked_fill(pad_mask, 0)
        low, high = int(padding.min()), int(padding.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"padding holds id {low if low < 0 else high}, outside the vocabulary of {vocab}; pad "
                             f"with an id in 0..{vocab - 1} (pad_token_id, or the ids under attention_mask == 0)")
    low, high = int(real.min()), int(real.max())
    if high >= vocab:
        raise ValueError(f"prompt holds token id {high}, outside the model's vocabulary of {vocab}; "
                         f"encode prompts with the model's own tokenizer")
    table = getattr(model, "soft_tokens", None)
    n = 0 if table is None else table.weight.shape[0]
    if low < -n:
        raise ValueError(f"prompt holds id {low}; negative ids stand for the vectors of a soft prompt placed in the "
                         f"text (lmstack.peft.soft_prompt_ids), and this model has {n} of them")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is not None and not is_int(seed):
        raise ValueError(f"seed={seed!r} must be an integer (or None for torch's global generator)")
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))


# -- token selection ---------------------------------------------------------------------------
def plain(processors: dict, held: StepRules | None = None) -> bool:
    """True when ``processors`` (``process_logits``' keywords) and ``held`` leave greedy's argmax as it is
    (renormalize_logits does not change it)."""
    return is_greedy(processors.get("temperature")) and not reads_text(processors) and not held


def make_chooser(processors: dict, generator: torch.Generator | None, *, held: StepRules | None = None,
                 prompt_len: int = 0, record: list | None = None, guide: Guidance | None = None):
    """A function (logits (B, V), ids so far (B, t), mask (B, t) | None) -> next tokens (B,).

    ``processors``: ``process_logits``' keywords (temperature, the filters, repetition_penalty,
    no_repeat_ngram_size, bias); ``held``, the ``StepRules``, act at each step counted from ``prompt_len``.
    Plain greedy gets a bare argmax: the decode loop calls this every step. ``choose.check()``
    raises if sampling met a row with no distribution (NaN or inf logits), where HF's
    ``torch.multinomial`` raises: the draws record it on the device, so checking costs one sync.
    ``record``: a list that gets each step's processed scores (B, V) fp32 (``output_scores``).
    ``guide``: classifier-free guidance (``lmstack.generate.guidance``), first of the processors, as HF.
    """
    temperature = processors.get("temperature")
    if plain(processors, held) and record is None and guide is None:
        choose = lambda logits, ids, mask: logits.argmax(dim=-1)  # noqa: E731
        choose.check = lambda: None
        return choose
    invalid: list[torch.Tensor] = []  # a () bool flag on the logits' device, made at the first draw

    def choose(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rules = held(ids.shape[1] - prompt_len, logits.device) if held else {}
        scores = logits.float() if guide is None else guide.scores(logits, ids)
        scores = process_logits(scores, ids, input_mask=mask, **rules, **processors)
        if record is not None:
            record.append(scores.clone())  # (a buffer of the static cache's graph, or the logits themselves)
        if is_greedy(temperature):
            return scores.argmax(dim=-1)
        if not invalid:
            invalid.append(torch.zeros((), dtype=torch.bool, device=logits.device))
        return sample(scores, generator, invalid[0])

    def check() -> None:
        if invalid and bool(invalid[0]):
            raise ValueError(f"sampling met logits with no distribution to draw from (NaN or inf; temperature="
                             f"{temperature}): the model's outputs are not finite (weights, fp16 overflow?) or "
                             f"logits / temperature overflowed; check the model, or raise the temperature")

    choose.check = check
    return choose


# -- generation --------------------------------------------------------------------------------
def generate(
    model: torch.nn.Module,
    input_ids,
    max_new_tokens: int | None = None,
    *,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    top_h: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    min_new_tokens: int | None = None,
    min_length: int | None = None,
    sequence_bias: dict | list | None = None,
    bad_words_ids: list[list[int]] | None = None,
    suppress_tokens: list[int] | None = None,
    begin_suppress_tokens: list[int] | None = None,
    forced_eos_token_id: int | list[int] | None = None,
    exponential_decay_length_penalty: tuple[int, float] | None = None,
    renormalize_logits: bool = False,
    logits_processor=None,
    prefix_allowed_tokens_fn=None,
    stopping_criteria=None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | StopStrings | None = None,
    tokenizer: Tokenizer | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    stop_on_eos: bool = True,
    compile: bool = False,
    static_cache: bool | None = None,
    max_length: int | None = None,
    max_time: float | None = None,
    output_scores: bool = False,
    output_logits: bool = False,
    guidance_scale: float | None = None,
    negative_prompt_ids=None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
) -> GenerateOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens (default 64, or with ``max_length``,
    HF's cap on prompt + new tokens, that less the padded prompt length; ``max_new_tokens`` wins
    when both are given, as in HF).

    input_ids: (B, T) LongTensor or numpy array (left-padded rows need ``attention_mask``, 1 =
        token, 0 = padding, as HF; padding is never inferred from ``pad_token_id``), or a list of
        token-id lists of any lengths, left-padded here with ``pad_token_id`` (else the first EOS
        id, else 0).
    temperature: 0 or None = greedy; otherwise sample after the processors of
        ``lmstack.generate.sampling.process_logits`` (HF's order and semantics). Each filter is off
        unless given: transformers' ``generate(do_sample=True)`` applies ``top_k=50`` when not told
        otherwise, so pass ``top_k=50`` to sample what it samples.
    no_repeat_ngram_size: n > 0 = never produce an n-gram the row already holds (prompt included,
        its padding not), in every mode, as HF's.
    min_new_tokens, min_length: hold the EOS ids back until this many tokens are new (or, HF's
        ``min_length``, until the padded prompt and the new tokens are this long).
    top_h: when sampling, HF's top-H filter (``sampling.top_h_filter``, 0 < top_h <= 1; None = off).
    epsilon_cutoff, eta_cutoff, sequence_bias, bad_words_ids, suppress_tokens, begin_suppress_tokens,
    forced_eos_token_id, exponential_decay_length_penalty, renormalize_logits: HF's processors of
        those names (``lmstack.generate.sampling``), with HF's semantics and order, in every mode.
    prefix_allowed_tokens_fn: HF's: ``fn(prompt index, ids so far (t,))`` -> the token ids a row
        may take next (``sampling.PrefixConstraint``; a prompt's beams and samples share its index).
    stopping_criteria: HF's: a list of callables ``(input_ids, scores) -> done (rows,) bool`` (HF
        ``StoppingCriteria`` objects included), checked after each token (``stops.Criteria``); a
        row that is done keeps its last token and is padded from then on, as with stop strings.
    logits_processor: HF's: a list of callables ``(input_ids (rows, t), scores (rows, V) fp32) ->
        scores``, HF ``LogitsProcessor`` objects included, applied in order after the built-in
        processors and before the sampling filters (beam search: on log-probs), as HF does.
    eos_token_id: an id or a list (ints, numpy integers or a tensor); once a row emits one, its
        later tokens are ``pad_token_id`` (default: the first EOS id) and decoding stops when
        every row has. ``stop_on_eos=False`` ignores EOS (and without stop strings always
        generates ``max_new_tokens``).
    stop_strings, tokenizer: a row also ends at the token that completes one of these texts (HF's
        ``stop_strings``: the token is kept, and the text may begin in the prompt; see
        ``lmstack.generate.stops``); ``tokenizer`` (``lmstack.Tokenizer``) tells what text each id
        stands for. A ``StopStrings`` built once may be passed instead, with no tokenizer.
    seed: seeds a private ``torch.Generator``, so sampling is reproducible and leaves the global
        RNG alone.
    compile: run the decode step through ``torch.compile`` (see ``compiled_decode_step``).
    static_cache: decode on a static-shape cache (``static_decode_step``): with ``compile`` each
        step is one CUDA graph replay. None (default) = on when compiling on a CUDA device (or on
        torch 2.4). On a CPU the usual cache is faster (it attends over the filled slots only).
        The static cache stays allocated for the model's next call (``STATIC_CACHES``).
    num_beams: > 1 = beam search (``lmstack.generate.beam``, HF's ``generate(num_beams=N)``
        rules): deterministic with temperature 0 or None, else beam sampling (HF's
        ``do_sample=True``) after the filters given; with ``seed=None`` it draws from torch's global
        generator, as HF does, so ``torch.manual_seed(s)`` before either gives the same beams.
    num_return_sequences: with beam search, how many of the best hypotheses per prompt to return
        (1 .. num_beams), best first; when sampling, how many independent samples per prompt (each
        prompt prefilled once): either way prompt b's are rows ``b * num_return_sequences ...``.
    length_penalty: beam search ranks finished hypotheses by ``sum log p / L ** length_penalty``,
        L = generated tokens (EOS included, prompt not); > 0 favours longer ones, < 0 shorter ones.
    early_stopping: beam search stop rule, as HF: True = stop once ``num_beams`` hypotheses are
        finished; False = also stop when the best running beam, at its current length, cannot beat
        the worst finished one; "never" = the same but judged at ``max_new_tokens`` when
        ``length_penalty > 0``.
    max_time: seconds; once a step ends past them (counted from the call), decoding stops with that
        step's tokens (HF's ``max_time``; beam search then finishes as at its last step).
    output_scores, output_logits: also return, per new token, the scores it was chosen from (after
        the processors; beam search: the processed log-probs of each running beam) and the raw
        logits, fp32, as HF's ``scores`` and ``logits``; beam search then returns ``beam_indices``
        too. ``transition_scores(output)`` reads each chosen token's score out of them.
    guidance_scale, negative_prompt_ids, negative_prompt_attention_mask: classifier-free guidance
        (HF's keywords; ``lmstack.generate.guidance``): a scale other than 1 (1 or None: off)
        mixes each step's log-probs with those given an unconditional context, ``log p_u + scale
        * (log p - log p_u)``, before the other processors, in every mode. The context is the
        negative prompt(s) (one per prompt, or one for all; a tensor with an optional mask, or
        ragged lists), else each prompt's last token. The unconditional rows ride along in the
        batch (one forward pass a step for both; with ``compile`` on CUDA, one CUDA graph).
    Returns ``GenerateOutput(sequences=(B, T + T_new))``, T_new <= max_new_tokens; beam search
    returns ``(B * num_return_sequences, T + T_new)`` (sampling too) and the final beam ``scores``
    ``(B * num_return_sequences,)``, shorter hypotheses padded with ``pad_token_id``.
    """
    deadline = deadline_after(max_time)
    settings = {k: v for k, v in locals().items() if k in PROCESSING_KEYS}  # the logits-processing keywords
    check_sampling_args(**settings)
    eos = as_id_list(eos_token_id) if stop_on_eos else []
    if pad_token_id is not None and not is_int(pad_token_id):
        raise ValueError(f"pad_token_id={pad_token_id!r} must be a token id (an integer) or None")
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r} must be an integer >= 1")
    if not is_int(num_return_sequences) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences={num_return_sequences!r} must be an integer >= 1")
    if num_beams == 1 and num_return_sequences > 1 and is_greedy(temperature):
        raise ValueError(f"num_return_sequences={num_return_sequences} with greedy decoding would return one sequence "
                         f"{num_return_sequences} times: sample (temperature > 0), or search num_beams >= "
                         f"{num_return_sequences} beams")
    pad_id = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else None)
    device = next(model.parameters()).device
    ids, pad_mask = prepare_inputs(input_ids, attention_mask, pad_id if pad_id is not None else 0, device)
    max_new_tokens = check_length(model, ids.shape[1], max_new_tokens, max_length)
    check_ids(model, ids, pad_mask)
    processors, held = processing(model, eos, ids.shape[1], max_new_tokens,
                                  group=int(max(num_beams, num_return_sequences)), **settings)
    stops = stop_strings_for(stop_strings, tokenizer, model.config.vocab_size, device)
    criteria = criteria_for(stopping_criteria)
    from .guidance import guidance_for  # imported here: guidance builds on this module

    steps = Steps.for_device(device, compile=compile, static=static_cache)
    guide = guidance_for(model, guidance_scale, negative_prompt_ids, negative_prompt_attention_mask,
                         prompts=ids.shape[0], max_new_tokens=max_new_tokens, pad_value=pad_id or 0, steps=steps)
    steps = guide or steps  # guidance runs the steps: its rows ride along in the batch
    if num_beams > 1:
        from .beam import beam_search, check_beam_args  # imported here: beam builds on this module

        check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping)
        with cpu_decode_layout(model, compiled=compile), contextlib.closing(steps):
            return beam_search(
                model, ids, pad_mask, max_new_tokens, num_beams=int(num_beams),
                num_return_sequences=int(num_return_sequences),
                length_penalty=length_penalty, early_stopping=early_stopping, eos=eos, pad_id=pad_id or 0,
                processors=processors, held=held, generator=make_generator(seed, device), steps=steps, stops=stops,
                criteria=criteria,
                deadline=deadline, output_scores=output_scores, output_logits=output_logits,
            )
    step_scores, raw = ([] if output_scores else None), ([] if output_logits else None)
    choose = make_chooser(processors, make_generator(seed, device), held=held, prompt_len=ids.shape[1],
                          record=step_scores, guide=guide)
    with cpu_decode_layout(model, compiled=compile), contextlib.closing(steps), torch.inference_mode():
        seq = decode_loop(model, ids, pad_mask, max_new_tokens, choose, eos=eos, pad_id=pad_id or 0, steps=steps,
                          stops=stops, deadline=deadline, copies=int(num_return_sequences), raw=raw, criteria=criteria,
                          scores=step_scores)
    choose.check()
    return GenerateOutput(sequences=seq, step_scores=None if step_scores is None else tuple(step_scores),
                          logits=None if raw is None else tuple(raw))


def transition_scores(out: GenerateOutput, *, normalize_logits: bool = False) -> torch.Tensor:
    """Each new token's score in the scores it was chosen from, (rows, T_new) fp32, as HF's
    ``compute_transition_scores``: read from ``out.step_scores`` (``generate(..., output_scores=True)``),
    a beam-search token from the running beam ``out.beam_indices`` names, 0 past a hypothesis's end.
    ``normalize_logits``: log-softmax each step's scores first (greedy and sampling record processed
    logits, so this gives log-probs; beam search's are log-probs already)."""
    if out.step_scores is None:
        raise ValueError("transition_scores reads the scores of each step: pass output_scores=True to generate")
    stacked = torch.stack(out.step_scores)  # (steps, rows, V)
    if normalize_logits:
        stacked = stacked.log_softmax(dim=-1)
    if out.beam_indices is None:
        steps = stacked.shape[0]
        rows = torch.arange(out.sequences.shape[0], device=stacked.device)[:, None].expand(-1, steps)
    else:
        rows = out.beam_indices
        steps = rows.shape[1]
    tokens = out.sequences[:, out.sequences.shape[1] - steps :]
    at = torch.arange(steps, device=stacked.device)[None, :].expand_as(tokens)
    return stacked[at, rows.clamp(min=0), tokens].masked_fill(rows < 0, 0.0)


def decode_loop(
    model: torch.nn.Module,
    ids: torch.Tensor,
    pad_mask: torch.Tensor | None,
    max_new_tokens: int,
    choose,
    *,
    eos: list[int],
    pad_id: int,
    steps: Steps | None = None,
    stops: StopStrings | None = None,
    deadline: float | None = None,
    copies: int = 1,
    raw: list | None = None,
    criteria: Criteria | None = None,
    scores: list | None = None,
) -> torch.Tensor:
    """Prefill, then one decode step per new token; returns the sequences (B * copies, T + T_new),
    ``copies`` rows per prompt (prefilled once, then decoded as rows of their own). A row ends at an
    ``eos`` id or at the token completing one of ``stops``; all end at a step that finishes past
    ``deadline`` (``deadline_after``), or where ``criteria`` says it is done (given ``scores``, the
    list of processed scores the chooser records, or None). ``raw``: a list that gets each step's
    logits, fp32."""
    steps = steps or Steps()
    T = ids.shape[1]
    total = T + max_new_tokens
    positions = None if pad_mask is None else padded_positions(pad_mask)  # (B, T)
    cache, logits = steps.start(model, ids, positions, pad_mask, total, copies)  # (B * copies, V)
    if copies > 1:
        ids, pad_mask, positions = (None if x is None else x.repeat_interleave(copies, dim=0)
                                    for x in (ids, pad_mask, positions))
    B = ids.shape[0]
    seq = ids.new_empty(B, total)  # (B, T + N): prompt then new tokens, written in place
    seq[:, :T] = ids
    # Repetition penalty must skip the prompt's padding: a (B, total) mask, True past the prompt.
    seq_mask = None
    if pad_mask is not None:
        seq_mask = torch.ones(B, total, dtype=torch.bool, device=ids.device)
        seq_mask[:, :T] = pad_mask
    pos = None if positions is None else positions[:, -1:] + 1  # (B, 1), advanced in place

    eos_ids = torch.tensor(eos, dtype=torch.long, device=ids.device) if eos else None
    stop_states = None if stops is None else stops.start(ids, pad_mask)  # (B, n_strings)
    ending = eos_ids is not None or stops is not None or criteria is not None
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device) if ending else None
    # finished rows emit padding (HF) and, when it is a token of the vocabulary, feed it to the model as HF
    # does (their logits are then HF's too, for output_logits); else their own token
    feeds_pad = ending and 0 <= pad_id < model.config.vocab_size
    t = T
    for step in range(max_new_tokens):
        if raw is not None:
            raw.append(logits.to(torch.float32, copy=True))
        tok = choose(logits, seq[:, :t], None if seq_mask is None else seq_mask[:, :t])  # (B,)
        if ending:
            seq[:, t] = torch.where(unfinished, tok, pad_id)
            if eos_ids is not None:
                unfinished &= ~torch.isin(seq[:, t], eos_ids)
            if stops is not None:
                stop_states, hit = stops.step(stop_states, tok)
                unfinished &= ~hit
            if criteria is not None:
                unfinished &= ~criteria(seq[:, : t + 1], None if scores is None else tuple(scores))
        else:
            seq[:, t] = tok
        t += 1
        if step == max_new_tokens - 1 or (ending and not bool(unfinished.any())) or out_of_time(deadline):
            break
        logits = steps(model, seq[:, t - 1 : t].contiguous() if feeds_pad else tok[:, None], cache, pos)
        if pos is not None:
            pos += 1
    return seq[:, :t]


def generate_stream(
    model: torch.nn.Module,
    input_ids,
    max_new_tokens: int | None = None,
    *,
    temperature: float | None = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    epsilon_cutoff: float | None = None,
    eta_cutoff: float | None = None,
    top_h: float | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    min_new_tokens: int | None = None,
    min_length: int | None = None,
    sequence_bias: dict | list | None = None,
    bad_words_ids: list[list[int]] | None = None,
    suppress_tokens: list[int] | None = None,
    begin_suppress_tokens: list[int] | None = None,
    forced_eos_token_id: int | list[int] | None = None,
    exponential_decay_length_penalty: tuple[int, float] | None = None,
    renormalize_logits: bool = False,
    logits_processor=None,
    prefix_allowed_tokens_fn=None,
    stopping_criteria=None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | StopStrings | None = None,
    tokenizer: Tokenizer | None = None,
    seed: int | None = None,
    compile: bool = False,
    static_cache: bool | None = None,
    max_length: int | None = None,
    max_time: float | None = None,
    guidance_scale: float | None = None,
    negative_prompt_ids=None,
) -> Iterator[int]:
    """Yield the new token ids of one prompt (a 1-D list or tensor of ids) one at a time, stopping
    before an EOS id (which is not yielded) or after the token that completes one of
    ``stop_strings`` (which is). Same logits-processing, length (``max_new_tokens``,
    ``max_length``, ``max_time``: counted from the first token asked for), ``compile``,
    ``static_cache`` and guidance (``guidance_scale``, one negative prompt: a 1-D list or tensor)
    keywords as ``generate``; the arguments are
    checked here, before the first token is asked for. Like ``generate``, the stream decodes with
    the model's CPU decode layout (``cpu_decode_layout``), from the first token until the stream is
    exhausted or closed, so the model's weights must not change in between (its KV cache would be
    stale too)."""
    settings = {k: v for k, v in locals().items() if k in PROCESSING_KEYS}  # the logits-processing keywords
    check_sampling_args(**settings)
    refuse_text(input_ids)
    prompt = torch.as_tensor(input_ids)  # its own dtype: prepare_inputs refuses float and bool ids
    if prompt.dim() != 1:
        raise ValueError(f"generate_stream takes one prompt, a 1-D list or tensor of ids; got {tuple(prompt.shape)}")
    device = next(model.parameters()).device
    ids, _ = prepare_inputs(prompt, None, 0, device)  # (1, T)
    max_new_tokens = check_length(model, ids.shape[1], max_new_tokens, max_length)
    check_ids(model, ids, None)
    eos = as_id_list(eos_token_id)
    processors, held = processing(model, eos, ids.shape[1], max_new_tokens, **settings)
    from .guidance import guidance_for  # imported here: guidance builds on this module

    if negative_prompt_ids is not None:
        try:
            shape = tuple(torch.as_tensor(negative_prompt_ids).shape)
        except (TypeError, ValueError, RuntimeError):
            shape = None
        if shape is None or len(shape) != 1:
            raise ValueError(f"generate_stream takes one negative prompt, a 1-D list or tensor of ids; got "
                             f"{shape or type(negative_prompt_ids).__name__}")
    steps = Steps.for_device(device, compile=compile, static=static_cache)
    guide = guidance_for(model, guidance_scale, negative_prompt_ids, None, prompts=1, max_new_tokens=max_new_tokens,
                         pad_value=0, steps=steps)
    steps = guide or steps
    choose = make_chooser(processors, make_generator(seed, device), held=held, prompt_len=ids.shape[1], guide=guide)
    stops = stop_strings_for(stop_strings, tokenizer, model.config.vocab_size, device)
    criteria = criteria_for(stopping_criteria)
    check_max_time(max_time)  # the clock starts at the first token asked for
    return stream_loop(model, ids, max_new_tokens, choose, eos=set(eos), steps=steps, stops=stops, max_time=max_time,
                       criteria=criteria)


@torch.inference_mode()  # on a generator: the mode is entered around each resume, not left on between yields
def stream_loop(
    model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, choose, *, eos: set[int],
    steps: Steps | None = None, stops: StopStrings | None = None, max_time: float | None = None,
    criteria: Criteria | None = None,
) -> Iterator[int]:
    """The decode loop for one prompt (1, T), yielding each new token as a Python int. The CPU
    decode layout (and a static cache, if ``steps`` took one) stays on from the first token until
    the stream ends or is closed."""
    steps = steps or Steps()
    deadline = deadline_after(max_time)
    with cpu_decode_layout(model, compiled=steps.compile), contextlib.closing(steps):
        T = ids.shape[1]
        cache, logits = steps.start(model, ids, None, None, T + max_new_tokens)  # (1, V)
        seq = ids.new_empty(1, T + max_new_tokens)
        seq[:, :T] = ids
        stop_states = None if stops is None else stops.start(ids, None)
        for step in range(max_new_tokens):
            tok = choose(logits, seq[:, : T + step], None)  # (1,)
            token = int(tok)  # the one host sync streaming needs
            choose.check()
            if token in eos:
                return
            hit = False
            seq[:, T + step] = tok
            if stops is not None:
                stop_states, hit = stops.step(stop_states, tok)
                hit = bool(hit)
            if criteria is not None and not hit:
                hit = bool(criteria(seq[:, : T + step + 1], None)[0])
            yield token
            if hit or out_of_time(deadline):  # the token that stops is yielded, as HF keeps it
                return
            if step < max_new_tokens - 1:
                logits = steps(model, tok[:, None], cache, None)
