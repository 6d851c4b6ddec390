"""The reduction over ranks, which owns its padding and its collectives: `Exact` (the default,
`train.reduce=exact`) and `Fast`. A reduction takes each chunk's gradients as the compute gives
them (`take`), then makes the step's meta-gradient in the parameters' .grad (`reduce`), with the
ranks' stop votes riding the same buffer.

Exact: the global meta-batch of B tasks is cut into K = B / g fixed groups of g consecutive tasks
(g = the plan's tasks at once), the same groups at every world size. A group is computed at once,
always with the same shapes and kernels, so its gradient has the same bits on any rank of any
world. The canonical sum is the dyadic tree over the groups 0..K-1: node [a, a+2^j) = left half +
right half, and a node whose right half lies past K is its left half. Rank r of W owns groups
[r*K/W, (r+1)*K/W); it sums them into the maximal dyadic blocks of that range (`TreeSum`), and
`merge` combines every rank's blocks into the root by the same additions in the same order as one
process makes: float addition of two numbers is exact to the last bit, so the weights are
identical for every W that divides K (given the same kernels and threads on every rank). No
property of the kernels is assumed or checked.

Fast: each rank's chunks accumulated into .grad, one all-reduce whose float32 sum order depends
on the world size.
"""

from __future__ import annotations

import time

import torch

VOTES = 3  # the stop votes that ride the reduction: time, signal, a shard changed


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


def layout(groups: int, world: int) -> list[list[tuple[int, int]]]:
    """Every rank's blocks: rank r owns groups [r*K/W, (r+1)*K/W)."""
    per = groups // world
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
    """Group vectors pushed in index order (from `first`) -> this range's dyadic block sums."""

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


def _flat(grads, params: list[torch.Tensor], extra: int) -> torch.Tensor:
    """One flat gradient (zeros where a weight got none), then `extra` zeros."""
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
        + [params[0].new_zeros(extra)]
    )


def chunk_scale(reduce: str, meta_batch_size: int, local_tasks: int) -> float:
    """What a chunk's summed task losses are scaled by: exact, 1/B (the same at every world size);
    fast, 1/a rank's tasks (then averaged over ranks by the all-reduce)."""
    return 1.0 / (meta_batch_size if reduce == "exact" else local_tasks)


class Exact:
    """The fixed groups' gradients summed by the canonical tree (see the module's docstring)."""

    def __init__(self, dist, params: list[torch.Tensor], meta_batch_size: int, at_once: int):
        groups, world = meta_batch_size // at_once, dist.world
        self.dist, self.params = dist, params
        self.scale = chunk_scale("exact", meta_batch_size, 0)
        self.layout = layout(groups, world)
        self.first = dist.rank * (groups // world)  # this rank's first group
        self.n_grad = sum(p.numel() for p in params)
        # VOTES slots for the stop votes, padded to a multiple of the world size so the
        # all-to-all sends the vector as it is (zeros change no sum)
        self.extra = VOTES + (-(self.n_grad + VOTES)) % world
        self.tree = None

    def start(self) -> None:
        self.tree = TreeSum(self.first)

    def take(self, grads) -> None:
        self.tree.push(_flat(grads, self.params, self.extra))

    def vectors(self) -> list[torch.Tensor]:
        """This rank's block sums (a captured graph's outputs, on a GPU)."""
        return [v for _, _, v in self.tree.blocks()]

    def reduce(self, vectors, votes: torch.Tensor, step: int) -> torch.Tensor:
        """The meta-gradient of this rank's block sums `vectors` and every other rank's into
        params' .grad (views of one flat buffer); returns the votes summed over ranks."""
        n = self.n_grad
        vectors[0][n : n + VOTES] = votes.to(vectors[0])  # this step's own buffer: no copy
        mine = [(a, size, v) for (a, size), v in zip(self.layout[self.dist.rank], vectors)]
        flat = self._mean(mine, step)
        for p, g in zip(self.params, torch.split(flat[:n], [p.numel() for p in self.params])):
            p.grad = g.view_as(p)
        return flat[n : n + VOTES]

    def _mean(self, mine: list, step: int) -> torch.Tensor:
        """The canonical tree sum of every rank's block sums. Each rank sends slice j of its
        blocks to rank j (all-to-all), rank j merges its slice of every block in the one canonical
        order, and the merged slices are gathered: the same additions, element by element, as one
        process makes. With one block per rank nothing is copied before sending."""
        d = self.dist
        if d.world == 1:
            return merge(mine)
        t = time.perf_counter()
        n, w = mine[0][2].numel(), d.world
        width, most = n // w, max(len(b) for b in self.layout)
        if most == 1:
            send = mine[0][2]
        else:
            send = mine[0][2].new_zeros(w, most, width)
            for i, (_, _, v) in enumerate(mine):
                send[:, i].copy_(v.view(w, width))
        recv = d.buffer("recv", (w, most, width), send)
        d.all_to_all(
            recv.view(-1), send.reshape(-1), f"the meta-gradient all-to-all of step {step}"
        )
        part = merge(
            [(a, size, recv[r, i]) for r in range(w) for i, (a, size) in enumerate(self.layout[r])]
        )
        out = d.buffer("out", (n,), part)  # becomes the gradients, consumed before the next step
        d.all_gather(out, part.contiguous(), f"the meta-gradient all-gather of step {step}")
        d.reduce_seconds += time.perf_counter() - t
        return out


class Fast:
    """Each rank's chunks accumulated into .grad, then one all-reduce of a flat buffer that also
    carries the votes."""

    def __init__(self, dist, params: list[torch.Tensor], local_tasks: int):
        self.dist, self.params = dist, params
        self.scale = chunk_scale("fast", 0, local_tasks)

    def start(self) -> None:
        pass

    def take(self, grads) -> None:
        for p, g in zip(self.params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def vectors(self) -> list[torch.Tensor]:
        return []  # the gradients are in .grad

    def reduce(self, vectors, votes: torch.Tensor, step: int) -> torch.Tensor:
        """The meta-gradient averaged into .grad; the votes averaged over ranks (> 0: someone
        voted)."""
        d = self.dist
        if d.world == 1:
            return votes
        t = time.perf_counter()
        flat = _flat([p.grad for p in self.params], self.params, 0)
        flat = torch.cat([flat, votes.to(flat)])
        d.all_reduce(flat, f"the meta-gradient all-reduce of step {step}")
        flat /= d.world
        n = flat.numel() - votes.numel()
        for p, g in zip(self.params, torch.split(flat[:n], [p.numel() for p in self.params])):
            p.grad = g.view_as(p)  # views of the reduced buffer: no copy back
        d.reduce_seconds += time.perf_counter() - t
        return flat[n:]
