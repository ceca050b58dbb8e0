"""The lmstack Transformer: a LLaMA-family decoder (Touvron et al. 2023).

Design, every choice in one place (all of them set by ``ModelConfig``):

- token embedding -> ``n_layers`` x Block -> RMSNorm -> LM head (optionally tied to the embedding)
- Block: x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))   (pre-norm, no biases except
  Qwen2's optional q/k/v bias)
- Attention: RoPE on q and k (rotate-half pairing, ``rope_theta``, optional scaling); MHA / GQA /
  MQA through ``n_kv_heads``; optional sliding window (Mistral); one ``lmstack.kernels.attention``
  call per layer, whatever the backend
- positions come from the KV cache offset, explicit ``positions`` (left-padded batches) or the
  packed-sequence metadata ``seqs`` (restart per document)
- submodule names follow HF LLaMA (``embed_tokens``, ``layers.N.self_attn.q_proj`` …,
  ``mlp.gate_proj`` …, ``input_layernorm``, ``post_attention_layernorm``, ``norm``, ``lm_head``)
  so state-dict keys and PEFT target lists carry over
- init: N(0, init_std), residual output projections scaled by 1/sqrt(2 n_layers)
- extension point, inert by default: every sequence may start with ``virtual_tokens`` learned
  positions (soft prompts, per-layer prefix keys/values; ``lmstack.peft`` sets them by module
  replacement). Real tokens' RoPE positions start after them, padding masks and the KV cache get
  columns for them, and logits never include them. Or learned vectors may sit inside the text:
  with ``soft_tokens`` set, an input id -1-k stands for row k of ``soft_tokens.weight`` (prompt
  tuning placed before the answer, as P-tuning's templates place them); these are ordinary
  positions, so packing, caching and positions need nothing special
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .attention import Attention, AttnContext
from .cache import KVCache
from .init import init_weights
from .mlp import MLP
from .norm import RMSNorm
from .rope import dynamic_rope, rope_attention_scale, rope_inv_freq, rope_tables


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, attn_backend: str | None = None):
        super().__init__()
        self.config = cfg
        self.attn_backend = attn_backend  # None: lmstack.kernels picks the best for the device
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Virtual leading positions (module docstring). ``virtual_embeds``, when set, is a module
        # mapping a batch size B to (B, virtual_tokens, dim) input embeddings fed through the layers
        # ahead of the tokens; when None, the attention modules supply those positions' keys/values
        # themselves (``AttnContext.virtual``).
        self.virtual_tokens = 0
        self.virtual_embeds: nn.Module | None = None
        # Soft tokens inside the text (module docstring): a module whose ``weight`` (n, dim) holds the
        # vectors that input ids -1 ... -n stand for. None: every input id must be a vocabulary id.
        self.soft_tokens: nn.Module | None = None
        cos, sin = self.rope_buffers(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg)

    @staticmethod
    def rope_buffers(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin tables (max_seq_len, head_dim), float32; not saved in checkpoints."""
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return rope_tables(inv_freq, cfg.max_seq_len, rope_attention_scale(cfg.rope_scaling))

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``...: the RoPE tables move with the weights but stay
        float32 (``forward`` casts what it uses to the weights' dtype, as HF does), so a model loaded
        in bf16 and then upcast computes the rotation as exactly as one loaded in fp32."""
        super()._apply(fn, recurse)
        cos = self.rope_cos
        if cos.dtype != torch.float32 and cos.device.type != "meta":
            self.rope_cos, self.rope_sin = (t.to(cos.device) for t in self.rope_buffers(self.config))
        return self

    @classmethod
    def empty(cls, cfg: ModelConfig, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> "Transformer":
        """A model with uninitialised weights allocated once, directly in ``dtype`` on ``device``
        (for loaders that fill every weight: no random init, no second copy)."""
        if dtype is not None:
            check_model_dtype(dtype)
        with torch.device("meta"):
            model = cls(cfg)
        if dtype is not None:
            model = model.to(dtype=dtype)
        model = model.to_empty(device=device or "cpu")
        cos, sin = cls.rope_buffers(cfg)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as files store it: a tied LM head is the embedding, so it is left out
        (safetensors refuses shared storage, and HF omits it too)."""
        sd = self.state_dict()
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    # -- KV cache -----------------------------------------------------------------------------
    def setup_cache(
        self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, reuse: KVCache | None = None,
    ) -> KVCache:
        """Allocate a KV cache for ``batch_size`` rows of up to ``max_len`` tokens (default: context),
        plus room for the model's ``virtual_tokens``. ``reuse``: a cache from earlier; if it has
        this layout it is emptied, zeroed and returned (its buffers keep their addresses, which
        CUDA graphs need), else it is dropped before the new one is allocated."""
        cfg = self.config
        V = self.virtual_tokens
        max_len = cfg.max_seq_len - V if max_len is None else max_len
        if max_len + V > cfg.max_seq_len:
            extra = f" + {V} virtual tokens" if V else ""
            raise ValueError(f"cache max_len={max_len}{extra} exceeds the model context max_seq_len={cfg.max_seq_len}")
        p = self.embed_tokens.weight
        dtype, device = dtype or p.dtype, torch.device(device) if device is not None else p.device
        shape = (batch_size, cfg.n_kv_heads, max_len + V, cfg.head_dim)
        if reuse is not None and reuse.fits(cfg.n_layers, shape, dtype, device):
            reuse.reset(zero=True)
            return reuse
        reuse = None  # frees it first (the caller passes the only reference)
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_len + V, dtype=dtype, device=device)

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        seqs: kernels.Seqs | None = None,
        pad_mask: torch.Tensor | None = None,
        cache_slots: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ):
        """input_ids (B, T) -> logits (B, T, vocab) (or the last ``logits_to_keep`` positions).

        positions: (B, T) or (T,) RoPE positions; default: cache offset + arange(T), or
            ``seqs.positions`` for packed batches.
        cache: a ``KVCache`` from ``setup_cache``; the new keys/values are appended to it.
        seqs: packed-document metadata (``lmstack.kernels.Seqs``): attention stays within documents.
        pad_mask: (B, T) False at padding tokens of ``input_ids`` (left padding); with a cache it
            is remembered for later decode steps.
        cache_slots: (T,) int64, a static-shape step (CUDA graphs): write the new keys/values at
            these cache slots and attend over the whole cache, masked past them. Needs ``cache``
            (already holding the prompt) and ``positions``; reads no Python-side cache state and
            leaves ``cache.length`` to the caller, so every step runs the same code on the same
            shapes. See ``lmstack.generate.decode.static_decode_step``.
        return_hidden: also return the final (normed) hidden state (B, T, dim).
        With ``virtual_tokens`` (module docstring), ``positions`` and ``pad_mask`` still describe
        the T real tokens only; the model shifts and extends them.
        """
        B, T = input_ids.shape
        static = cache_slots is not None
        if static and (cache is None or positions is None or pad_mask is not None):
            raise ValueError("cache_slots (a static-shape step) needs a cache and positions, and takes no pad_mask")
        start = cache.length if cache is not None and not static else 0
        lead = self.virtual_tokens if start == 0 and not static else 0  # virtual positions beginning in this call
        inject = lead if self.virtual_embeds is not None else 0  # of those, fed through the layers
        if self.virtual_tokens:
            positions = self.virtual_positions(positions, seqs, start, lead, inject, T, input_ids.device)
        if positions is None and seqs is not None:
            positions = seqs.positions
        if positions is None and start + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the model context max_seq_len={self.config.max_seq_len}"
            )
        scaling = self.config.rope_scaling
        if scaling is not None and scaling["type"] == "dynamic":  # frequencies depend on the length
            pos = torch.arange(start, start + T, device=input_ids.device) if positions is None else positions
            cos, sin = dynamic_rope(self.config.head_dim, self.config.rope_theta, scaling, pos)
        elif positions is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, D)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B|1, T, D)
        dtype = self.embed_tokens.weight.dtype  # the tables are float32; the rotation runs in the weights'
        cos, sin = cos.to(dtype), sin.to(dtype)
        if cos.dim() == 2:
            cos, sin = cos[None, None], sin[None, None]  # (1, 1, T, D)
        else:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)

        if lead and pad_mask is not None:
            pad_mask = torch.cat([pad_mask.new_ones(B, lead, dtype=torch.bool), pad_mask.bool()], dim=1)
        if static:
            key_valid = cache.key_valid  # (B, max_len): padding of the prompt, True elsewhere
        else:
            key_valid = cache.mark(B, lead + T, pad_mask) if cache is not None else pad_mask
        ctx = AttnContext(cos=cos, sin=sin, cache=cache, seqs=seqs, key_valid=key_valid, backend=self.attn_backend,
                          virtual=lead - inject, slots=cache_slots)
        x = self.embed(input_ids)  # (B, T, dim)
        if inject:
            x = torch.cat([self.virtual_embeds(B).to(x.dtype), x], dim=1)  # (B, inject + T, dim)
        for layer in self.layers:
            x = layer(x, ctx)
        if cache is not None and not static:
            cache.advance(lead + T)
        if inject:
            x = x[:, inject:]  # (B, T, dim): callers see their own tokens only
        h = self.norm(x)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # (B, T, vocab)
        return (logits, h) if return_hidden else logits

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, dim): the token embedding, and with ``soft_tokens`` the learned
        vector -1-id where an id is negative."""
        if self.soft_tokens is None:
            return self.embed_tokens(input_ids)
        table = self.soft_tokens.weight  # (n, dim)
        x = self.embed_tokens(input_ids.clamp(min=0))
        soft = table[(-1 - input_ids).clamp(0, table.shape[0] - 1)]  # (B, T, dim); used where id < 0
        return torch.where((input_ids < 0).unsqueeze(-1), soft.to(x.dtype), x)

    def virtual_positions(self, positions, seqs, start: int, lead: int, inject: int, T: int, device) -> torch.Tensor:
        """RoPE positions of this call's rows when the model has ``virtual_tokens``: those of the T
        real tokens (the caller's, counting real tokens only, or the default) shifted past the
        virtual ones, after ``arange(inject)`` for virtual positions fed through the layers."""
        V = self.virtual_tokens
        if seqs is not None:
            raise ValueError(f"packed sequences (seqs) cannot be combined with {V} virtual tokens; turn packing off")
        if positions is None:
            end = start + lead + T  # a cache already counts the virtual positions in ``start``
            if end > self.config.max_seq_len:
                raise ValueError(
                    f"sequence of {end} tokens ({V} virtual included) exceeds the model context "
                    f"max_seq_len={self.config.max_seq_len}"
                )
            return torch.arange(end - inject - T, end, device=device)  # (inject + T,)
        positions = positions + V
        if inject:
            ahead = torch.arange(inject, device=positions.device).expand(*positions.shape[:-1], inject)
            positions = torch.cat([ahead, positions], dim=-1)  # (B|., inject + T)
        return positions

    def num_params(self, *, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n


MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_model_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if the model can hold its weights in it, else a one-line ValueError."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype={dtype} is not one the model runs in; pass torch.float32, torch.bfloat16, "
                         f"torch.float16 or torch.float64")
    return dtype


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in (even on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
