"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation")
and P-tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks").

Every attention layer gets ``num_virtual_tokens`` learned key/value pairs placed before the keys
and values of the sequence; every query attends to them, the model weights stay frozen. They act
like a prompt that exists only inside attention, at every depth. The prefixes carry no RoPE
rotation (they are learned post-rotation keys) and the real tokens' positions start after them, as
in HF peft, where they enter as a pre-filled KV cache.

Li & Liang found training the prefixes directly unstable and reparameterised them through an MLP:
a (P, kv_dim) embedding -> Linear -> tanh -> Linear to n_layers * 2 * kv_dim ("prefix"). Once
trained, the MLP is folded away: its output is all inference needs (``fold``; saving always stores
the folded prefixes). P-tuning v2 trains the per-layer prefixes directly ("ptuning_v2").

Initialisation: N(0, 1), as HF peft, or, with ``init_text`` (or ``init_token_ids``), the keys and
values the frozen model itself computes for that text at positions 0..P-1 (Li & Liang's
"initialise with the activations of real words", their best choice with little data). Then the
adapted model starts out exactly as the base model reading the text before every input, instead of
attending to random vectors; for "prefix" the MLP's last layer is solved (least squares, minimum
norm) so that it outputs those keys and values.

Layout of the flat prefix table (P, n_layers * 2 * kv_dim), as HF peft's ``prompt_embeddings``:
columns [2l * kv_dim, (2l + 1) * kv_dim) hold layer l's keys, the next kv_dim its values, each
ordered (kv head, head_dim).

Trainable parameters (P = num_virtual_tokens, L = n_layers, kv = n_kv_heads * head_dim,
h = encoder_hidden_size): ptuning_v2 P * L * 2 * kv; prefix P * kv + (kv * h + h) +
(h * L * 2 * kv + L * 2 * kv).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import eval_mode
from .common import AdapterModule, Wrapper, like
from .prompt import init_ids, token_ids_of


class PrefixEncoder(AdapterModule):
    """All layers' prefixes: a flat table, or an embedding and MLP that compute it."""

    def __init__(self, P: int, n_layers: int, n_kv_heads: int, head_dim: int, hidden: int | None, ref: torch.Tensor):
        super().__init__()
        self.P, self.n_layers, self.n_kv_heads, self.head_dim = P, n_layers, n_kv_heads, head_dim
        kv = n_kv_heads * head_dim
        # N(0, 1) init, as HF peft's (nn.Embedding's default)
        if hidden is None:
            self.table = nn.Parameter(torch.randn(P, n_layers * 2 * kv, **like(ref)))  # (P, L*2*kv)
        else:
            self.embedding = nn.Parameter(torch.randn(P, kv, **like(ref)))  # (P, kv)
            self.mlp = nn.Sequential(
                nn.Linear(kv, hidden, **like(ref)), nn.Tanh(), nn.Linear(hidden, n_layers * 2 * kv, **like(ref))
            )

    @torch.no_grad()
    def init_from(self, table: torch.Tensor) -> None:
        """Make the encoder output ``table`` (P, L * 2 * kv): copied when folded; otherwise the last
        linear map is the minimum-norm least-squares solution of tanh(first(embedding)) -> table,
        exact when P <= hidden + 1 (the default, P <= kv)."""
        if self.folded:
            self.table.copy_(table)
            return
        first, _, last = self.mlp
        h = torch.tanh(first(self.embedding)).double()  # (P, hidden)
        h1 = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)  # a column for the bias
        sol = torch.linalg.pinv(h1) @ table.double()  # (hidden + 1, L * 2 * kv)
        last.weight.copy_(sol[:-1].t())
        last.bias.copy_(sol[-1])

    @property
    def folded(self) -> bool:
        return "table" in self._parameters

    def layer_rows(self, layer: int) -> torch.Tensor:
        """(P, 2 * kv): layer ``layer``'s slice of the table (through the MLP, only its rows of the
        last linear map)."""
        w = 2 * self.n_kv_heads * self.head_dim
        if self.folded:
            return self.table[:, layer * w : (layer + 1) * w]
        first, _, last = self.mlp
        rows = slice(layer * w, (layer + 1) * w)
        return nn.functional.linear(torch.tanh(first(self.embedding)), last.weight[rows], last.bias[rows])

    def full_table(self) -> torch.Tensor:
        """(P, L * 2 * kv): every layer's prefixes, bit-identical to what ``layer_rows`` gives."""
        if self.folded:
            return self.table
        return torch.cat([self.layer_rows(i) for i in range(self.n_layers)], dim=1)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s prefix keys and values, each (n_kv_heads, P, head_dim)."""
        t = self.layer_rows(layer).view(self.P, 2, self.n_kv_heads, self.head_dim)
        k, v = t.permute(1, 2, 0, 3)  # 2 x (Hkv, P, D)
        return k, v

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the embedding + MLP by the table they compute (inference needs nothing else)."""
        if not self.folded:
            table = self.full_table().detach().clone()
            del self.embedding, self.mlp
            self.table = nn.Parameter(table)


class PrefixAttention(Wrapper):
    """The layer's attention with the prefix keys/values in front of the sequence's."""

    def __init__(self, base_layer: nn.Module, encoder: PrefixEncoder, layer_idx: int):
        super().__init__(base_layer)
        self.layer_idx = layer_idx
        # The encoder is registered once, on the model; here it is only referenced (no duplicate
        # parameters in state dicts or optimizers).
        self.__dict__["encoder"] = encoder

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        q, k, v = self.base_layer.project(x, ctx)  # q (B, Hq, T, D), k/v (B, Hkv, T, D)
        if ctx.virtual:  # the sequence starts in this call: its keys begin with the prefix
            B = k.shape[0]
            pk, pv = self.encoder.layer_kv(self.layer_idx)  # (Hkv, P, D)
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, Hkv, P + T, D)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        return self.base_layer.attend(q, k, v, ctx)


@torch.no_grad()
def text_kv_table(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The keys and values ``model`` computes for the token ids ``ids`` at positions 0..len-1, as a
    prefix table (len, n_layers * 2 * kv): each row the layers' keys then values, (kv head, head_dim)."""
    emb = model.embed_tokens.weight
    cache = model.setup_cache(1, len(ids))
    with eval_mode(model):
        model(torch.tensor([ids], device=emb.device), cache=cache, logits_to_keep=1)
    P = len(ids)
    cols = [t[0, :, :P].transpose(0, 1).reshape(P, -1) for layer in zip(cache.k, cache.v) for t in layer]
    return torch.cat(cols, dim=1)  # (P, L * 2 * kv): [k_0 | v_0 | k_1 | v_1 | ...]


def apply_prefix_like(model: nn.Module, num_virtual_tokens: int, hidden: int | None, init_token_ids=None,
                      init_text: str | None = None, tokenizer=None) -> None:
    cfg = model.config
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens={num_virtual_tokens!r} must be an integer >= 1")
    for i, layer in enumerate(model.layers):
        if not (hasattr(layer.self_attn, "project") and hasattr(layer.self_attn, "attend")):
            raise ValueError(f"layers.{i}.self_attn ({type(layer.self_attn).__name__}) has no project/attend "
                             "steps; prefix tuning supports lmstack.model.Attention only")
    init_token_ids = token_ids_of(init_token_ids, init_text, tokenizer, model.embed_tokens.weight.shape[0])
    enc = PrefixEncoder(num_virtual_tokens, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, hidden,
                        model.embed_tokens.weight)
    if init_token_ids is not None:  # before any attention is wrapped: the plain model's own keys/values
        enc.init_from(text_kv_table(model, init_ids(num_virtual_tokens, init_token_ids)))
    model.prefix_encoder = enc
    for i, layer in enumerate(model.layers):
        layer.self_attn = PrefixAttention(layer.self_attn, enc, i)
    model.virtual_tokens = num_virtual_tokens


def apply_prefix(model: nn.Module, *, num_virtual_tokens: int = 20, encoder_hidden_size: int | None = None,
                 init_token_ids=None, init_text: str | None = None, tokenizer=None) -> None:
    """Prefix tuning with the MLP reparameterisation; ``encoder_hidden_size`` defaults to
    n_kv_heads * head_dim (HF peft's default). ``init_text`` (with ``tokenizer``) or
    ``init_token_ids``: start from the model's own keys/values for that text (module docstring)."""
    cfg = model.config
    hidden = cfg.n_kv_heads * cfg.head_dim if encoder_hidden_size is None else encoder_hidden_size
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"encoder_hidden_size={encoder_hidden_size!r} must be an integer >= 1")
    apply_prefix_like(model, num_virtual_tokens, hidden, init_token_ids, init_text, tokenizer)


def apply_ptuning_v2(model: nn.Module, *, num_virtual_tokens: int = 20, init_token_ids=None,
                     init_text: str | None = None, tokenizer=None) -> None:
    """P-tuning v2: the per-layer prefixes themselves are the parameters; initialised as
    ``apply_prefix``'s."""
    apply_prefix_like(model, num_virtual_tokens, None, init_token_ids, init_text, tokenizer)
