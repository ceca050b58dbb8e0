"""Training parity with HF transformers: the same loss on the same weights gives the same gradient
for every parameter (fp32), on a left-padded batch (attention mask and positions) whose loss
skips the padding, for each family (Qwen2's q/k/v biases non-zero, Mistral's window shorter than
the rows, tied and untied embeddings)."""

import pytest
import torch
import torch.nn.functional as F

from lmstack.generate.decode import padded_positions

from ..hf_models import FAMILIES, tiny_hf

V = 128


def _loss(logits, ids, mask):
    """Mean next-token cross-entropy over targets that are real tokens after a real token."""
    keep = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])[keep]
    return F.cross_entropy(flat.float(), ids[:, 1:].reshape(-1)[keep])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_hf(seed, family, tied):
    hf, m = tiny_hf(family, window=5, tied=tied, seed=seed)
    with torch.no_grad():  # HF starts biases at 0, where a wrong bias gradient path would not show
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
        m.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=False)
    hf.train(), m.train()
    lengths = [17, 9, 1 + 12]
    T = max(lengths)
    ids = torch.randint(0, V, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = True
    pos = padded_positions(mask)
    ours = _loss(m(ids, positions=pos, pad_mask=mask), ids, mask)
    theirs = _loss(hf(ids, attention_mask=mask.long(), position_ids=pos).logits, ids, mask)
    assert abs(ours.item() - theirs.item()) < 1e-5
    ours.backward()
    theirs.backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in m.named_parameters():
        ref = hf_params["lm_head.weight" if name == "lm_head.weight" else "model." + name].grad
        assert p.grad is not None and ref is not None, name
        scale = ref.abs().max().item()
        assert scale > 0, name  # every parameter is reached by this loss
        assert (p.grad - ref).abs().max().item() <= 1e-4 * max(scale, 1.0), name
        checked += 1
    assert checked == len(hf_params)  # tied: one shared matrix in both
