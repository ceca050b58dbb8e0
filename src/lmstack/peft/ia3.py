"""IA3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

Learned vectors rescale activations channel by channel: the keys and values (outputs of k_proj
and v_proj) and the FFN's inner activation (the input of down_proj). Each vector starts at ones,
so the model is unchanged at init. A scale on a linear map's output or input is a scale on its
weight's rows or columns, so ``merge`` folds it into the weight (and the bias of an output-scaled
layer) and inference costs nothing; ``unmerge`` divides it back out.

Trainable parameters: out_features per output-scaled layer + in_features per feed-forward
(input-scaled) layer; with the defaults 2 * n_kv_heads * head_dim + ffn_dim per block.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Wrapper, as_names, find_targets, like, named_suffix_match, replace_module

DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
DEFAULT_FEEDFORWARD = ("down_proj",)


class IA3Linear(Wrapper):
    def __init__(self, base_layer: nn.Linear, feedforward: bool):
        super().__init__(base_layer)
        self.feedforward = feedforward  # scale the input (columns of W) instead of the output (rows)
        n = base_layer.in_features if feedforward else base_layer.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, **like(base_layer.weight)))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        s = self.ia3_l  # fp32 on a half-precision base: scale in fp32 and round once, as peft does
        if self.feedforward:
            return self.base_layer((x.to(s.dtype) * s).to(x.dtype))
        y = self.base_layer(x)
        return (y.to(s.dtype) * s).to(y.dtype)

    @torch.no_grad()
    def _scale(self, invert: bool) -> None:
        w, b = self.base_layer.weight, self.base_layer.bias
        acc = torch.promote_types(w.dtype, torch.float32)
        s = self.ia3_l.to(acc)
        s = 1 / s if invert else s
        w.copy_((w.to(acc) * (s[None, :] if self.feedforward else s[:, None])).to(w.dtype))
        if b is not None and not self.feedforward:
            b.copy_((b.to(acc) * s).to(b.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._scale(invert=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            if bool((self.ia3_l == 0).any()):
                raise ValueError("cannot unmerge an IA3 scale that is exactly 0 (the merged weight lost that channel)")
            self._scale(invert=True)
            self.merged = False


def apply_ia3(
    model: nn.Module, *, target_modules=DEFAULT_TARGETS, feedforward_modules=DEFAULT_FEEDFORWARD
) -> None:
    """Wrap each targeted ``nn.Linear`` in an ``IA3Linear``: output-scaled, or input-scaled when
    its name also matches ``feedforward_modules`` (which must be a subset of the targets)."""
    targets = as_names(target_modules, "target_modules")
    ff = as_names(feedforward_modules, "feedforward_modules") if feedforward_modules else ()
    extra = [f for f in ff if f not in targets]
    if extra:
        raise ValueError(f"feedforward_modules {extra} must also be in target_modules {list(targets)}")
    names = find_targets(model, targets, nn.Linear, "target_modules")
    if "lm_head" in names and getattr(model.config, "tie_embeddings", False):
        raise ValueError("ia3 on lm_head of a model with tied embeddings would also scale the embedding when "
                         "merged; drop it")
    for name in names:
        replace_module(model, name, IA3Linear(model.get_submodule(name), named_suffix_match(name, ff)))
