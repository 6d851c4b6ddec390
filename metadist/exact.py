"""World-size-independent sums: the meta-gradient as a fixed binary tree over global chunk indices.

A step's B tasks are cut into K = B / c chunks of c tasks (`algo.tasks_per_chunk`); chunk k's
gradient is computed the same way whatever the world size (same shapes, same kernels). The
canonical sum is the dyadic tree over 0..K-1: node [a, a+2^j) = left half + right half, and a node
whose right half lies past K is its left half. Rank r of W owns chunks [r*K/W, (r+1)*K/W); it sums
them into the maximal dyadic blocks of that range (`TreeSum`), and `merge` combines every rank's
blocks into the root by the same additions in the same order as one process would make. Float
addition of two numbers is exact to the last bit on every device, so the result is identical
for any W (given per-chunk gradients that are identical: same thread count on a CPU).
"""

from __future__ import annotations

import torch


def blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """The maximal dyadic blocks (start, size) that tile [lo, hi), left to right."""
    out = []
    while lo < hi:
        size = lo & -lo if lo else 1 << (hi - 1).bit_length()
        while lo + size > hi:
            size //= 2
        out.append((lo, size))
        lo += size
    return out


def layout(chunks: int, world: int) -> list[list[tuple[int, int]]]:
    """Every rank's blocks: rank r owns chunks [r*K/W, (r+1)*K/W)."""
    per = chunks // world
    return [blocks(r * per, (r + 1) * per) for r in range(world)]


def _combine(stack: list, item: tuple) -> None:
    """Push (start, size, vector); join the top two while they are the two halves of one node."""
    stack.append(item)
    while len(stack) >= 2:
        (a, sa, va), (b, sb, vb) = stack[-2], stack[-1]
        if sa != sb or a % (2 * sa) or a + sa != b:
            break
        stack[-2:] = [(a, 2 * sa, va + vb)]


class TreeSum:
    """Chunk vectors pushed in index order (from `first`) -> this range's dyadic block sums."""

    def __init__(self, first: int):
        self.next, self.stack = first, []

    def push(self, vector: torch.Tensor) -> None:
        _combine(self.stack, (self.next, 1, vector))
        self.next += 1

    def blocks(self) -> list[tuple[int, int, torch.Tensor]]:
        return list(self.stack)


def merge(items: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """Block sums covering 0..K-1, in index order -> the root of the canonical tree."""
    stack: list = []
    for item in items:
        _combine(stack, item)
    total = stack[-1][2]
    for _, _, v in reversed(stack[:-1]):  # right halves past K are absent: fold from the right
        total = v + total
    return total
