"""Packed training (``doc_mask`` pretraining, packed instruction tuning) against an independent reference.

The reference never builds a ``Seqs`` and never packs: it cuts the batch the trainer built into its
documents (pretraining: a document ends at, and includes, each EOS; a row boundary ends one too),
runs every document *alone* through the model (positions from 0, nothing else visible) and weighs
the per-token losses as one big batch would (the mean over the trained targets of the whole
optimizer step, ``grad_accum`` micro-batches together). Loss and every parameter gradient are
compared in float64 (the models here are float64, and so are their losses).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmstack.data.corpus import TokenDataset, load_dataset
from lmstack.data.instruct import IGNORE_INDEX
from lmstack.data.packing import doc_seqs
from lmstack.kernels import Seqs
from lmstack.train import Trainer
from lmstack.train.finetune import Finetuner

# ---- helpers ------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


def _segments_eos(row: list[int], eos: int) -> list[tuple[int, int]]:
    """[start, end) of each document of one packed row: a document ends at (and includes) an EOS."""
    segs, s = [], 0
    for i, t in enumerate(row):
        if t == eos or i == len(row) - 1:
            segs.append((s, i + 1))
            s = i + 1
    return segs


def _doc_nll_sum(model, inputs: list[int], targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL of one document run alone (positions 0.., its own tokens only) and its trained count."""
    logits = model(torch.tensor(inputs, dtype=torch.long)[None])[0].double()
    keep = targets != IGNORE_INDEX
    if not keep.any():
        return logits.sum() * 0, 0
    return F.cross_entropy(logits[keep], targets[keep], reduction="sum"), int(keep.sum())


def _ref_pretrain(model, x: torch.Tensor, y: torch.Tensor, eos: int) -> torch.Tensor:
    total, n = 0, 0
    for b in range(x.shape[0]):
        row = x[b].tolist()
        for s, e in _segments_eos(row, eos):
            nll, k = _doc_nll_sum(model, row[s:e], y[b, s:e])
            total, n = total + nll, n + k
    return total / n


def _grads(loss, params):
    return [g.double() for g in torch.autograd.grad(loss, params)]


def _assert_grads_close(got, want, rtol=1e-10):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(w.abs().max().item(), 1e-12)
        err = (g - w).abs().max().item() / scale
        assert err < rtol * 10, f"gradient {i}: max relative error {err:.3e}"


def _capture_step_grads(trainer, step=0):
    """Run the trainer's own optimizer step, returning (accumulated loss, grads before the update)."""
    params = trainer.trainable()
    seen = {}

    def fake_step(*a, **k):
        seen["g"] = [p.grad.detach().double().clone() for p in params]

    trainer.optimizer.step = fake_step  # the instance attribute shadows AdamW.step
    loss, _ = trainer._optimizer_step(step)
    return loss, seen["g"]


# ---- Seqs metadata ------------------------------------------------------------------------------


def _ref_seqs(doc_ids: torch.Tensor):
    """Python-loop reference for Seqs.from_doc_ids: unique ids, positions, cu_seqlens, max_seqlen."""
    B, T = doc_ids.shape
    ids, pos, cu, nid = [], [], [0], -1
    for b in range(B):
        ri, rp = [], []
        for t in range(T):
            if t == 0 or doc_ids[b, t] != doc_ids[b, t - 1]:
                nid += 1
                if b or t:
                    cu.append(b * T + t)
                p = 0
            else:
                p += 1
            ri.append(nid)
            rp.append(p)
        ids.append(ri)
        pos.append(rp)
    cu.append(B * T)
    lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    return ids, pos, cu, max(lens)


@pytest.mark.parametrize("doc_ids", [
    [[0, 0, 0, 1, 1, 1, 1, 2]],                       # the docstring example
    [[0, 1, 2, 3, 4]],                                 # every document one token
    [[7, 7, 7, 7], [7, 7, 7, 7]],                      # a single document per row, same id across rows
    [[0, 0, 1, 1], [1, 1, 2, 2], [2, 3, 3, 3]],        # ids continuing over row boundaries
    [[5, 5, 2, 2, 5, 5]],                              # ids reused within a row (only changes matter)
    [[0]],
])
def test_seqs_from_doc_ids_matches_loop_reference(doc_ids):
    d = torch.tensor(doc_ids)
    s = Seqs.from_doc_ids(d)
    ids, pos, cu, mx = _ref_seqs(d)
    assert s.doc_ids.tolist() == ids
    assert s.positions.tolist() == pos
    assert s.cu_seqlens.tolist() == cu and s.cu_seqlens.dtype == torch.int32
    assert s.max_seqlen == mx


def test_seqs_from_eos_edge_cases():
    E = 1
    x = torch.tensor([
        [E, 5, 6, E, E, 7],   # EOS first (a 1-token doc), then a doc, then a lone EOS, then a tail
        [5, 6, 7, 8, 9, E],   # EOS last: the row is one document
        [E, E, E, E, E, E],   # six 1-token documents
        [4, 4, 4, 4, 4, 4],   # no EOS: one document (part of a longer one)
    ])
    s = Seqs.from_eos(x, E)
    segs = [_segments_eos(r, E) for r in x.tolist()]
    assert segs[0] == [(0, 1), (1, 4), (4, 5), (5, 6)]
    want_pos = [[i - a for a, b in row for i in range(a, b)] for row in segs]
    assert s.positions.tolist() == want_pos
    cu = [0] + [r * 6 + b for r, row in enumerate(segs) for _, b in row]
    assert s.cu_seqlens.tolist() == cu
    assert s.max_seqlen == 6
    assert s.doc_ids.flatten().tolist() == [k for k, (a, b) in enumerate(
        (a, b) for row in segs for a, b in row) for _ in range(b - a)]


# ---- pretraining with doc_mask ------------------------------------------------------------------

DOC_LENS = [5, 1, 7, 1, 0, 1, 20, 3, 2, 30, 1, 4, 9, 1, 6, 40, 2, 1, 1, 8]  # 0: EOS right after EOS


@pytest.fixture
def packed_trainer(tiny_dataset, train_cfg):
    """A doc_mask Trainer (float64 model) on a stream with 1-token documents, runs of EOS and documents
    longer than a row, so windows start and end mid-document."""
    base = load_dataset(tiny_dataset)
    eos = base.eos_id
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, base.vocab_size, n).tolist() for n in DOC_LENS * 4]
    docs = [[t if t != eos else eos + 1 for t in d] for d in docs]
    stream = np.array([t for d in docs for t in (*d, eos)], dtype=np.uint16)
    data = TokenDataset(dir=base.dir, meta=dict(base.meta), train=stream, val=stream.copy())

    def make(**kw):
        cfg = train_cfg(doc_mask=True, seq_len=24, batch_size=4, grad_clip=0.0, seed=42, device="cpu", **kw)
        t = Trainer(cfg, dataset=data, progress=False)
        t.model.double()
        return t

    return make


def test_doc_mask_batch_covers_the_edge_cases(packed_trainer):
    """The sampled batches really hold what the reference tests below are about."""
    t = packed_trainer(grad_accum=2)
    eos = t.eos_id
    for m in range(2):  # both micro-batches of step 0, which the tests below use
        rows = t._batch(0, m)[0].tolist()
        lens = [e - s for r in rows for s, e in _segments_eos(r, eos)]
        assert 1 in lens  # documents of one token
        assert any(eos not in r for r in rows)  # a row holding a single (row-spanning) document
        assert any(r[0] != eos and r[-1] != eos and eos in r for r in rows)  # starts and ends mid-document
        assert any(a == b == eos for r in rows for a, b in zip(r, r[1:]))  # EOS EOS: a lone-EOS document


def test_doc_mask_loss_and_grads_equal_separate_documents(packed_trainer):
    t = packed_trainer()
    x, y, seqs, _ = t._batch(0, 0)
    assert seqs is None  # pretraining: _loss derives the Seqs from EOS
    # RoPE is relative, so losses cannot tell whether positions restart: check them directly.
    want_pos = [[i - s for s, e in _segments_eos(r, t.eos_id) for i in range(s, e)] for r in x.tolist()]
    assert doc_seqs(x, t.eos_id).positions.tolist() == want_pos
    params = t.trainable()
    got = t._loss(x, y)
    want = _ref_pretrain(t.model, x, y, t.eos_id)
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=0)
    _assert_grads_close(_grads(got, params), _grads(want, params))


def test_doc_mask_eos_target_is_next_documents_first_token(packed_trainer):
    """Design (packing.py: 'a new document starts after every EOS'): the EOS closes its document and is
    trained to predict the next document's first token, from the closed document's context only."""
    t = packed_trainer()
    x, y, _, _ = t._batch(0, 0)
    eos = t.eos_id
    r, i = next((r, i) for r in range(x.shape[0]) for i in range(x.shape[1] - 1)
                if x[r, i] == eos and x[r, i + 1] != eos)
    assert y[r, i] == x[r, i + 1] != IGNORE_INDEX
    with torch.no_grad():
        packed = t.model(x, seqs=Seqs.from_eos(x, eos))[r, i]
        s = max([a for a, b in _segments_eos(x[r].tolist(), eos) if a <= i])
        alone = t.model(x[r : r + 1, s : i + 1])[0, -1]
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)


def test_doc_mask_grad_accum_equals_reference(packed_trainer):
    t = packed_trainer(grad_accum=2)
    batches = [t._batch(0, m)[:2] for m in range(2)]
    loss, got = _capture_step_grads(t, 0)
    params = t.trainable()
    # Every micro-batch has B*T targets, so the mean of micro-batch means is the token mean of the step.
    want = sum(_ref_pretrain(t.model, x, y, t.eos_id) for x, y in batches) / 2
    torch.testing.assert_close(loss.double(), want, rtol=1e-10, atol=0)
    _assert_grads_close(got, _grads(want, params))


def test_doc_mask_evaluate_equals_separate_documents(packed_trainer):
    t = packed_trainer()
    T = t.cfg.seq_len
    n_windows = (len(t.data.val) - 1) // T
    total, n = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            chunk = torch.from_numpy(np.asarray(t.data.val[w * T : w * T + T + 1], dtype=np.int64))
            total += float(_ref_pretrain(t.model, chunk[None, :-1], chunk[None, 1:], t.eos_id)) * T
            n += T
    got = t.evaluate()
    assert got["val_tokens"] == n
    assert got["val_loss"] == pytest.approx(total / n, rel=1e-10)


# ---- packed instruction tuning ------------------------------------------------------------------


def _batch_items(ft: Finetuner, k: int):
    """The TokenizedExamples of micro-batch k, row by row (from the rows/epoch order the batches use)."""
    b = ft.batches
    epoch, i = divmod(k, len(b))
    order = b._epoch_order(epoch)[i * b.batch_size : (i + 1) * b.batch_size]
    return [[b.items[j] for j in b.rows[r]] for r in order]


def _ref_instruct_sum(model, rows) -> tuple[torch.Tensor, int]:
    total, n = 0, 0
    for row in rows:
        for t in row:
            nll, c = _doc_nll_sum(model, list(t.ids[:-1]), torch.tensor(t.labels[1:]))
            total, n = total + nll, n + c
    return total, n


@pytest.fixture(scope="module")
def short_task(tmp_path_factory):
    """Short instruction records of varied lengths, so that several share a packed row."""
    import json
    import random

    rng = random.Random(3)
    words = ["thou", "art", "the", "king", "of", "my", "heart", "lord", "night"]
    recs = []
    for i in range(40):
        inp = " ".join(rng.choice(words) for _ in range(rng.randint(0, 5)))
        out = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        recs.append({"instruction": rng.choice(words), "input": inp, "output": out})
    root = tmp_path_factory.mktemp("short_task")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def _finetuner(ft_cfg, short_task, **kw) -> Finetuner:
    kw.setdefault("data", str(short_task))
    ft = Finetuner(ft_cfg(grad_clip=0.0, device="cpu", seq_len=60, **kw), progress=False)
    ft.model.double()
    return ft


def test_packed_finetune_loss_and_grads_equal_separate_examples(ft_cfg, short_task):
    ft = _finetuner(ft_cfg, short_task, batch_size=3)
    assert ft.cfg.packing
    x, y, seqs, _ = ft._batch(0, 0)
    rows = _batch_items(ft, 0)
    assert any(len(r) > 2 for r in rows)  # several examples share a row
    # response-only targets: every trained target is a response token of some example
    assert int((y != IGNORE_INDEX).sum()) == sum(sum(lab != IGNORE_INDEX for lab in t.labels[1:])
                                                 for row in rows for t in row)
    for r, row in enumerate(rows):  # positions restart per example; the padding tail is one more document
        want_pos = [i for t in row for i in range(t.n_inputs)]
        want_pos += list(range(x.shape[1] - len(want_pos)))
        assert seqs.positions[r].tolist() == want_pos
    params = ft.trainable()
    got = ft._loss(x, y, seqs)
    total, n = _ref_instruct_sum(ft.model, rows)
    want = total / n
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=0)
    _assert_grads_close(_grads(got, params), _grads(want, params))


def test_packed_finetune_grad_accum_matches_trainer_weighting(ft_cfg, short_task):
    """With gradient accumulation the step's loss is the token mean over all the step's trained
    targets (each micro-batch's mean weighted by its share of them), whatever each holds."""
    ft = _finetuner(ft_cfg, short_task, batch_size=2, grad_accum=2)
    params = ft.trainable()
    parts = [_ref_instruct_sum(ft.model, _batch_items(ft, m)) for m in range(2)]
    loss, got = _capture_step_grads(ft, 0)
    want = sum(s for s, _ in parts) / sum(c for _, c in parts)
    torch.testing.assert_close(loss.double(), want, rtol=1e-10, atol=0)
    _assert_grads_close(got, _grads(want, params))


def test_finetune_grad_accum_equals_one_big_batch(ft_cfg, short_task):
    """grad_accum=2 x batch_size=2 visits exactly the rows of batch_size=4 (same packing, same epoch
    order), so one optimizer step should see the same loss and gradient: the token mean over the
    step's trained targets, as one batch of 4 rows gives."""
    acc = _finetuner(ft_cfg, short_task, batch_size=2, grad_accum=2, out_dir=str(ft_cfg().out_dir) + "-acc")
    big = _finetuner(ft_cfg, short_task, batch_size=4, grad_accum=1, out_dir=str(ft_cfg().out_dir) + "-big")
    assert [t.ids for r in _batch_items(big, 0) for t in r] == \
        [t.ids for m in range(2) for r in _batch_items(acc, m) for t in r]
    total, n = _ref_instruct_sum(big.model, _batch_items(big, 0))
    want = total / n  # the token mean over the optimizer step
    loss_big, g_big = _capture_step_grads(big, 0)
    loss_acc, g_acc = _capture_step_grads(acc, 0)
    counts = [_ref_instruct_sum(acc.model, _batch_items(acc, m))[1] for m in range(2)]
    assert counts[0] != counts[1]  # else both weightings agree and this would check nothing
    torch.testing.assert_close(loss_big.double(), want, rtol=1e-10, atol=0)
    _assert_grads_close(g_big, _grads(want, big.trainable()))
    # Failed before: each micro-batch's mean was weighted 1/grad_accum whatever its number of trained
    # targets, so a response token of micro-batch m weighed 1/(2 * counts[m]) instead of 1/sum(counts).
    torch.testing.assert_close(loss_acc.double(), want, rtol=1e-10, atol=0,
                               msg=lambda m: f"{m}\ntrained targets per micro-batch: {counts}")
    _assert_grads_close(g_acc, g_big)
