"""Reber-grammar strings, generated here (no download): the benchmark of Darji's sparse-RNN
study (https://arxiv.org/abs/2407.20601) and a classic test of recurrent memory.

The Reber grammar is a 6-state automaton over the symbols B T P S X V E (Reber 1967; the graph
of Fahlman's and Hochreiter & Schmidhuber's LSTM experiments). The *embedded* grammar wraps a
Reber string as ``B T <reber> T E`` or ``B P <reber> P E``: predicting the second-to-last
symbol needs the second symbol, remembered across the whole inner string.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SYMBOLS", "PAD", "VOCAB_SIZE", "reber_string", "embedded_reber_string", "reber_lm_data"]

SYMBOLS = "BTPSXVE"
PAD = len(SYMBOLS)  # token after the final E
VOCAB_SIZE = PAD + 1
# state -> ((symbol, next state), (symbol, next state)); state 6 ends the string.
_GRAPH = {
    1: (("T", 2), ("P", 3)),
    2: (("S", 2), ("X", 4)),
    3: (("T", 3), ("V", 5)),
    4: (("X", 3), ("S", 6)),
    5: (("P", 4), ("V", 6)),
}


def reber_string(rng: np.random.Generator) -> str:
    """One Reber string ``B ... E``, each branch taken with probability 1/2."""
    out, state = ["B"], 1
    while state != 6:
        symbol, state = _GRAPH[state][int(rng.integers(2))]
        out.append(symbol)
    return "".join(out) + "E"


def embedded_reber_string(rng: np.random.Generator) -> str:
    """``B T <reber> T E`` or ``B P <reber> P E``."""
    wrap = "TP"[int(rng.integers(2))]
    return "B" + wrap + reber_string(rng) + wrap + "E"


def reber_lm_data(
    num: int, seq_len: int, seed: int, embedded: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Next-symbol data: ``(x, y)`` int32 ``[num, seq_len]`` with y = x shifted by one, strings
    padded with `PAD` after E (strings longer than ``seq_len + 1`` are redrawn)."""
    rng = np.random.default_rng(seed)
    gen = embedded_reber_string if embedded else reber_string
    rows = np.full((num, seq_len + 1), PAD, np.int32)
    i = 0
    while i < num:
        s = gen(rng)
        if len(s) > seq_len + 1:
            continue
        rows[i, : len(s)] = [SYMBOLS.index(c) for c in s]
        i += 1
    return rows[:, :-1], rows[:, 1:]
