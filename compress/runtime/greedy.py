"""The one greedy stopping rule every runner shares, so backends differ only in how they compute logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def greedy(first: Sequence[int], step: Callable[[list[int]], Sequence[int]], eos: set[int], pad: int,
           max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
    """Collect up to `max_new_tokens` per row.

    `first` is each row's argmax after the prefill; `step(fed)` feeds one token per row (the pad token
    for rows that already stopped) and returns the next argmax per row. A row stops at its first eos,
    which is not included; `ignore_eos` keeps every row going for exactly `max_new_tokens` (benchmarks
    compare equal output lengths).
    """
    tokens: list[list[int]] = [[] for _ in first]
    done = [False] * len(first)
    nxt = [int(t) for t in first]
    for n in range(max_new_tokens):
        for i, tok in enumerate(nxt):
            if done[i]:
                continue
            if tok in eos and not ignore_eos:
                done[i] = True
            else:
                tokens[i].append(tok)
        if all(done) or n == max_new_tokens - 1:
            break
        nxt = [int(t) for t in step([pad if d else t for d, t in zip(done, nxt, strict=True)])]
    return tokens
