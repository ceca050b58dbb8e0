"""Stop strings: end a sequence once its text holds one of them (HF ``generate(stop_strings=...)``).

A sequence stops at the token that completes a stop string, the string's last character falling
inside that token; the token stays in the output, as HF's ``StopStringCriteria`` keeps it. Matching
is on the text the tokens stand for, so a string may span several tokens or begin in the middle of
one ("st" + "opper" completes "stop"), and may begin in the prompt; one wholly inside the prompt
stops nothing.

No text is decoded while generating. Each stop string ``s`` (as UTF-8 bytes, length ``L``) gets the
Knuth-Morris-Pratt automaton whose state is the length of the longest suffix of the text so far
that is a prefix of ``s``; reaching state ``L`` is a match. Running every token's bytes through it
from every state once, up front, gives two (L + 1, V) tables: the state after the token, and
whether the token passed through state ``L``. A decode step is then one gather per row and stop
string, on the device, with no host sync: a row's states are advanced by the token it emitted, and
beam search looks up each candidate extension before choosing the beams.

Two deliberate differences from transformers: a row a stop string ended is padded from then on even
when no EOS id is set (transformers pads only when one is, and otherwise goes on generating that
row until every row has stopped), and prompt padding is never read as text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .sampling import callables


def match_automaton(pattern: bytes) -> np.ndarray:
    """(L + 1, 256) int64: the KMP state after reading a byte in each state (state ``L`` = matched;
    reading on from it continues from the longest proper border, so overlapping matches count)."""
    L = len(pattern)
    delta = np.zeros((L + 1, 256), dtype=np.int64)
    delta[0, pattern[0]] = 1
    border = 0  # the state reached from 0 by pattern[1:q]: where a mismatch at q falls back to
    for q in range(1, L + 1):
        delta[q] = delta[border]
        if q < L:
            delta[q, pattern[q]] = q + 1
            border = delta[border, pattern[q]]
    return delta


def read_tokens(delta: np.ndarray, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """Run n tokens (bytes ``flat[starts[t] : starts[t] + lengths[t]]``) through the automaton
    ``delta`` from each of its states: the (L + 1, n) states after each token, and whether the
    token passed through state L."""
    L, n = delta.shape[0] - 1, len(starts)
    order = np.argsort(-lengths, kind="stable")  # longest first: the tokens still read at byte j are a prefix
    starts = starts[order]
    still = n - np.searchsorted(np.sort(lengths), np.arange(int(lengths.max(initial=0))), side="right")
    state = np.repeat(np.arange(L + 1)[:, None], n, axis=1)
    passed = np.zeros((L + 1, n), dtype=bool)
    for j, m in enumerate(still):  # byte j of the m tokens that long
        state[:, :m] = delta[state[:, :m], flat[starts[:m] + j]]
        passed[:, :m] |= state[:, :m] == L
    out_state, out_passed = np.empty_like(state), np.empty_like(passed)
    out_state[:, order], out_passed[:, order] = state, passed
    return out_state, out_passed


class StopStrings:
    """Stop strings compiled against a vocabulary: ``StopStrings(["\\nUser:", "###"], tokenizer)``,
    or ``token_texts``, the UTF-8 bytes of each id (``Tokenizer.token_texts()``; ids past it stand
    for no text). ``vocab_size`` widens the tables to the model's vocabulary when it is larger."""

    def __init__(self, strings: str | Sequence[str], tokenizer=None, *, token_texts: Sequence[bytes] | None = None,
                 vocab_size: int = 0):
        strings = [strings] if isinstance(strings, str) else strings
        if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings={strings!r} must be a non-empty string or a list of them")
        if tokenizer is None and token_texts is None:
            raise ValueError("stop_strings needs the tokenizer that the ids come from: pass "
                             "tokenizer=Tokenizer.from_file(model folder) to generate")
        if tokenizer is not None and token_texts is not None:
            raise ValueError("pass StopStrings a tokenizer or token_texts, not both")
        texts = list(tokenizer.token_texts() if token_texts is None else token_texts)
        self.strings = tuple(strings)
        patterns = [s.encode("utf-8") for s in strings]
        V = max(len(texts), vocab_size)
        texts += [b""] * (V - len(texts))
        longest = max(map(len, patterns))
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=V)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = np.frombuffer(b"".join(texts), dtype=np.uint8)
        nxt = np.zeros((len(patterns), longest + 1, V), dtype=np.int16 if longest < 2**15 else np.int64)
        hit = np.zeros((len(patterns), longest + 1, V), dtype=bool)
        for i, pattern in enumerate(patterns):
            L = len(pattern)
            # A token with none of the pattern's bytes resets every state to 0 (an empty one keeps it):
            # only the others are read through the automaton.
            in_pattern = np.zeros(256, dtype=bool)
            in_pattern[list(pattern)] = True
            seen = np.concatenate([[0], np.cumsum(in_pattern[flat])])
            reads = np.flatnonzero(seen[starts + lengths] > seen[starts])
            states, hits = nxt[i, : L + 1], hit[i, : L + 1]  # views: (L + 1, V)
            states[:, lengths == 0] = np.arange(L + 1)[:, None]
            delta = match_automaton(pattern)
            states[:, reads], hits[:, reads] = read_tokens(delta, flat, starts[reads], lengths[reads])
        self.next_state = torch.from_numpy(nxt)  # (S, Lmax + 1, V)
        self.hits = torch.from_numpy(hit)  # (S, Lmax + 1, V)
        self.vocab_size = V

    def to(self, device: torch.device) -> StopStrings:
        self.next_state, self.hits = self.next_state.to(device), self.hits.to(device)
        return self

    def step(self, states: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows' states (R, S) int64 read tokens (R,): the new states and (R,) True where a stop
        string ended inside the token."""
        which = torch.arange(states.shape[1], device=states.device)[None, :]
        tokens = tokens[:, None]
        return self.next_state[which, states, tokens].long(), self.hits[which, states, tokens].any(dim=1)

    def start(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, S) states after the prompts ids (B, T), skipping padding (mask False). Only the last
        ``longest stop string`` tokens can hold a prefix of one (every token stands for one byte
        or more; HF's criterion looks back as far)."""
        B, T = ids.shape
        states = ids.new_zeros(B, len(self.strings))
        for p in range(max(0, T - self.next_state.shape[1] + 1), T):
            new, _ = self.step(states, ids[:, p])
            states = new if mask is None else torch.where(mask[:, p : p + 1].bool(), new, states)
        return states


def stop_strings_for(stop_strings, tokenizer, vocab_size: int, device: torch.device) -> StopStrings | None:
    """``generate``'s ``stop_strings`` (strings, or a ``StopStrings`` already built) on ``device``."""
    if stop_strings is None:
        return None
    if isinstance(stop_strings, StopStrings):
        if stop_strings.vocab_size < vocab_size:
            raise ValueError(f"stop_strings was built for {stop_strings.vocab_size} token ids, but the model has "
                             f"{vocab_size}; build it with vocab_size={vocab_size}")
        return stop_strings.to(device)
    return StopStrings(stop_strings, tokenizer, vocab_size=vocab_size).to(device)


class Criteria:
    """HF's ``stopping_criteria``: callables ``(input_ids (rows, t), scores) -> done``, HF
    ``StoppingCriteria`` objects included, where ``done`` is a bool tensor (rows,) or one bool for
    every row. A row is done when any of them says so, checked after each token is appended (its
    text holds the token, as HF's; a finished row's holds its padding). ``scores`` is what HF
    passes: the processed scores of the steps so far (a tuple) with ``output_scores``, else None.
    Under beam search each candidate extension is checked, and one that is done ends like one
    ending in EOS. As with stop strings, a row that is done is padded from then on even without an
    EOS id (transformers pads only when one is set)."""

    def __init__(self, fns):
        self.fns = callables(fns, "stopping_criteria",
                             "(input_ids, scores) -> bool tensor (rows,), such as HF StoppingCriteria objects")

    def __call__(self, ids: torch.Tensor, scores) -> torch.Tensor:
        rows = ids.shape[0]
        done = torch.zeros(rows, dtype=torch.bool, device=ids.device)
        for i, fn in enumerate(self.fns):
            out = fn(ids, scores)
            if isinstance(out, (bool, np.bool_)):
                out = torch.full((rows,), bool(out), device=ids.device)
            if not isinstance(out, torch.Tensor) or out.shape not in ((rows,), ()):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"stopping_criteria[{i}] ({type(fn).__name__}) returned {got}; it must return a bool "
                                 f"tensor of shape ({rows},), one per row, or one bool")
            done |= out.to(device=ids.device, dtype=torch.bool)
        return done


def criteria_for(stopping_criteria) -> Criteria | None:
    """``generate``'s ``stopping_criteria`` (None or empty: none), checked."""
    if stopping_criteria is None or (isinstance(stopping_criteria, (list, tuple)) and not stopping_criteria):
        return None
    return Criteria(stopping_criteria)
