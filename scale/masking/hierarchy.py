"""A binary tree of patches per image by average-linkage merging of a patch similarity (EHM;
the similarity comes from the model's attention, `similarity.py`).

Exact greedy merging repeatedly joins the most similar pair of clusters, the similarity of
two clusters being the mean of their leaf-to-leaf similarities. Two forms build it, batched
over images:

- `greedy`: one merge per image per round, N - 1 rounds (the definition; the reference);
- `rnn`: every reciprocal-nearest-neighbour pair merges in the same round. Average linkage is
  reducible, so this yields the identical tree in a few dozen rounds for N = 196 (the GPU form).

Both must agree bit for bit, whatever the floating-point order of their sums, so the similarity
is first quantized per image to integers (2^q steps of its maximum) and every cluster-to-cluster
sum is an exact integer held in float64. A pair's mean is then one correctly rounded division,
identical in both forms, and q is small enough that a merged cluster is never rounded above both
of its parts (reducibility survives rounding). Ties go to the pair of smallest leaf indices: a
cluster lives in the slot of its smallest leaf, so `argmax`'s first maximum is that pair.

Encoding (one row per image, one column per slot = leaf index): slot `b > 0` is absorbed once, into
`parent[b] < b`, creating a node of level `merge_level[b]` (leaves are level 1, a node is one more
than its highest child); `left_size[b]` is the size of the cluster it joined (the node's child
holding the smaller leaves). This is canonical: equal trees have equal encodings.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Optional, Tuple

import torch

# CUDA: merging rounds the host may queue past the last "anything left to merge?" flag it has read.
ROUNDS_AHEAD = 4


def quantization_bits(num_patches: int) -> int:
    """q such that sums stay exact in float64 (N^2 2^q < 2^52) and a merged cluster's mean, whose
    exact value differs from its parts' by at least 1 / N^3 steps, still rounds apart (2^q N^3 < 2^50)."""
    return max(8, min(30, math.floor(50 - 3 * math.log2(max(num_patches, 2)))))


def quantize_similarity(similarity: torch.Tensor) -> torch.Tensor:
    """(B, N, N) similarity -> float64 integers in [0, 2^q], scaled per image by its largest
    off-diagonal entry (the tree does not depend on the scale; the diagonal is never merged)."""
    n = similarity.shape[-1]
    s = similarity.double().clamp(min=0) * (1 - torch.eye(n, dtype=torch.float64, device=similarity.device))
    top = s.flatten(1).amax(dim=1).clamp(min=torch.finfo(torch.float64).tiny)
    return torch.round(s / top[:, None, None] * 2.0 ** quantization_bits(s.shape[-1]))


@dataclass
class PatchTree:
    parent: torch.Tensor  # (B, N) long: the slot each slot was absorbed into; -1 for slot 0 (the root's)
    merge_level: torch.Tensor  # (B, N) long: level of the node created by that merge; 0 for slot 0
    left_size: torch.Tensor  # (B, N) long: size of the cluster it joined
    rounds: int  # merging rounds the builder ran (on CUDA a few past the last merge: see _MergesLeft)

    @property
    def height(self) -> torch.Tensor:
        """(B,) level of each image's root."""
        return self.merge_level.max(dim=1).values

    @property
    def level_bound(self) -> int:
        """No level is above it: a round merges each cluster once at most, raising its level by one, and leaves
        are level 1. The loops over levels run to it, known on the host: reading `height` from the device would
        stall the step (a level above the height includes no merge, so its pass changes nothing)."""
        return self.rounds + 1

    def cut(self, depth: torch.Tensor) -> torch.Tensor:
        """(B,) levels -> (B, N) part of each patch: its highest ancestor of level <= depth, named
        by that node's smallest leaf. depth 1: every patch its own part; depth >= height: one part."""
        labels = torch.arange(self.parent.shape[1], device=self.parent.device).expand_as(self.parent).clone()
        parent = self.parent.clamp(min=0)
        for _ in range(self.level_bound):  # each pass climbs one included merge
            level = self.merge_level.gather(1, labels)
            climb = (level > 0) & (level <= depth[:, None])
            labels = torch.where(climb, parent.gather(1, labels), labels)
        return labels

    def cluster_sizes(self) -> torch.Tensor:
        """(B, N) leaves in the cluster each slot held when it was absorbed (slot 0: all N)."""
        size = torch.ones_like(self.parent)
        parent = self.parent.clamp(min=0)
        for level in range(2, self.level_bound + 1):  # children before parents
            absorbed = self.merge_level == level
            size = size.scatter_add(1, parent, torch.where(absorbed, size, 0))
        return size

    def leaf_positions(self, swapped: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N) each patch's position in a depth-first leaf order of the tree: every subtree, hence
        every part, is one contiguous run of positions. At each merge the child holding the smaller
        leaves comes first, unless `swapped` (B, N) bool is True at the slot that merge absorbed: then
        the absorbed child does (EHM draws these per merge, so that neither child is favoured)."""
        if swapped is None:
            swapped = torch.zeros_like(self.parent, dtype=torch.bool)
        parent = self.parent.clamp(min=0)
        absorbed_first = torch.where(swapped, self.cluster_sizes(), 0)  # how far a swap moves the absorbing child
        after_left = torch.where(swapped, 0, self.left_size)  # the absorbed child's offset in its merge's node
        start = torch.zeros_like(self.parent)  # where a slot's cluster starts, once the merge absorbing it is placed
        # How far a slot's own sub-cluster sits from its cluster's start, from the swapped merges placed so far:
        # merges go top-down, so at level L it holds the shifts of the merges above L.
        shift = torch.zeros_like(self.parent)
        for level in range(self.level_bound, 1, -1):  # parents before children
            absorbed = self.merge_level == level
            node_start = (start + shift).gather(1, parent)  # where the node this merge creates starts
            start = torch.where(absorbed, node_start + after_left, start)
            shift = shift.scatter_add(1, parent, torch.where(absorbed, absorbed_first, 0))
        return start + shift


@dataclass
class _MergeState:
    """Clusters while merging, one row per image, one column per slot."""
    sums: torch.Tensor  # (B, N, N) float64 integers: leaf-to-leaf similarity summed over each pair of clusters
    sizes: torch.Tensor  # (B, N) float64: leaves per cluster
    active: torch.Tensor  # (B, N) bool: the slot still holds a cluster
    level: torch.Tensor  # (B, N) long: the cluster's level
    parent: torch.Tensor  # the PatchTree encoding being filled in
    merge_level: torch.Tensor
    left_size: torch.Tensor

    @classmethod
    def leaves(cls, similarity: torch.Tensor) -> "_MergeState":
        sums = quantize_similarity(similarity)
        batch, n = sums.shape[:2]

        def filled(value, dtype):
            return torch.full((batch, n), value, dtype=dtype, device=sums.device)
        return cls(sums, filled(1.0, torch.float64), filled(True, torch.bool), filled(1, torch.long),
                   filled(-1, torch.long), filled(0, torch.long), filled(0, torch.long))


def _mean_similarity(sums: torch.Tensor, sizes: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Cluster-to-cluster mean similarity; -inf on the diagonal and for absorbed slots."""
    n = sizes.shape[1]
    mean = sums / (sizes[:, :, None] * sizes[:, None, :])
    valid = active[:, :, None] & active[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=sums.device)
    return mean.masked_fill(~valid, float("-inf"))


def greedy_average_linkage(similarity: torch.Tensor) -> PatchTree:
    """The definition: per image, merge the single most similar pair, N - 1 times."""
    st = _MergeState.leaves(similarity)
    batch, n = st.sizes.shape
    rows = torch.arange(batch, device=st.sums.device)
    upper = torch.ones(n, n, dtype=torch.bool, device=st.sums.device).triu(1)
    for _ in range(n - 1):
        mean = _mean_similarity(st.sums, st.sizes, st.active).masked_fill(~upper, float("-inf"))
        flat = mean.flatten(1).argmax(dim=1)  # first maximum: the pair of smallest (a, b)
        a, b = flat // n, flat % n
        new_level = torch.maximum(st.level[rows, a], st.level[rows, b]) + 1
        st.parent[rows, b], st.merge_level[rows, b], st.left_size[rows, b] = a, new_level, st.sizes[rows, a].long()
        st.sums[rows, a, :] += st.sums[rows, b, :]
        st.sums[rows, :, a] += st.sums[rows, :, b]
        st.sizes[rows, a] += st.sizes[rows, b]
        st.active[rows, b] = False
        st.level[rows, a] = new_level
    return PatchTree(st.parent, st.merge_level, st.left_size, rounds=n - 1)


class _MergesLeft:
    """Whether any image still has clusters to merge, read without stalling the device.

    The number of rounds depends on the similarity, but reading the answer at every round would wait
    for the device each time. Each round's flag is copied to host memory instead (pinned, non-blocking,
    an event marking its arrival) and the host reads the flags that have arrived: it queues a few
    rounds past the last merge, which merge nothing and change nothing. Once ROUNDS_AHEAD flags are
    outstanding it waits for the oldest, so the device always has rounds queued and never idles. On
    the CPU the device is the host: a flag is there once copied (other devices copy it blocking)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.flags: Deque[Tuple[torch.Tensor, Optional[torch.cuda.Event]]] = deque()  # (host flag, arrival)

    def record(self, active: torch.Tensor) -> None:
        """After a round: whether some image of `active` (B, N) still holds more than one cluster."""
        host = torch.empty((), dtype=torch.bool, pin_memory=self.cuda)
        host.copy_((active.sum(dim=1) > 1).any(), non_blocking=self.cuda)  # elsewhere: there when copy_ returns
        arrival = torch.cuda.Event() if self.cuda else None
        if arrival is not None:
            arrival.record(torch.cuda.current_stream(active.device))
        self.flags.append((host, arrival))

    def none(self) -> bool:
        """True once a flag that has arrived says nothing is left to merge."""
        while self.flags:
            host, arrival = self.flags[0]
            if arrival is not None and not arrival.query():
                if len(self.flags) < ROUNDS_AHEAD:
                    return False
                arrival.synchronize()  # the rounds queued after it keep the device busy meanwhile
            self.flags.popleft()
            if not host.tolist():  # host memory: no device read
                return True
        return False


def reciprocal_nn_average_linkage(similarity: torch.Tensor) -> PatchTree:
    """The same tree: each round merges every pair of clusters that are each other's nearest neighbour.
    At most N - 1 rounds: while clusters are left, the most similar pair are each other's nearest."""
    st = _MergeState.leaves(similarity)
    batch, n = st.sizes.shape
    slots = torch.arange(n, device=st.sums.device).expand(batch, n)
    rounds = 0
    merges_left = _MergesLeft(st.sums.device)
    merges_left.record(st.active)
    while rounds < n - 1 and not merges_left.none():
        rounds += 1
        nearest = _mean_similarity(st.sums, st.sizes, st.active).argmax(dim=2)  # ties: the smallest slot
        merging = st.active & (nearest.gather(1, nearest) == slots) & (slots < nearest)  # a of each pair (a, b)
        # b -> a for each merging pair; non-merging slots write into a spare column
        spare = torch.full((batch, n + 1), -1, dtype=torch.long, device=st.sums.device)
        a_of_b = spare.scatter_(1, torch.where(merging, nearest, n), torch.where(merging, slots, -1))[:, :n]
        absorbed = a_of_b >= 0
        a = a_of_b.clamp(min=0)
        st.parent = torch.where(absorbed, a, st.parent)
        st.merge_level = torch.where(absorbed, torch.maximum(st.level.gather(1, a), st.level) + 1, st.merge_level)
        st.left_size = torch.where(absorbed, st.sizes.gather(1, a).long(), st.left_size)
        st.level = torch.where(merging, torch.maximum(st.level, st.level.gather(1, nearest)) + 1, st.level)
        target = torch.where(absorbed, a, slots)
        sums = torch.zeros_like(st.sums).scatter_add_(1, target[:, :, None].expand(-1, -1, n), st.sums)
        st.sums = torch.zeros_like(sums).scatter_add_(2, target[:, None, :].expand(-1, n, -1), sums)
        st.sizes = torch.zeros_like(st.sizes).scatter_add_(1, target, st.sizes).clamp(min=1)
        st.active &= ~absorbed
        merges_left.record(st.active)
    return PatchTree(st.parent, st.merge_level, st.left_size, rounds=rounds)


TREE_BUILDERS: Dict[str, Callable[[torch.Tensor], PatchTree]] = {
    "rnn": reciprocal_nn_average_linkage,
    "greedy": greedy_average_linkage,
}
