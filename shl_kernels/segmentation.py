"""The Segmentation container and the greedy segmentation of SPEC section 2."""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np
import torch

from .label_matrix import label_csr
from .segment_numba import segment_csr


@dataclass(frozen=True)
class SegmentationStats:
    """Facts about the training labels, recorded when the segmentation was computed."""

    num_documents: int
    num_positives: int  # (document, label) pairs
    max_labels_per_document: int  # a lower bound on the number of segments at tau = 0
    num_cooccurring_pairs: int  # unordered label pairs with M_jk > 0
    num_conflicting_pairs: int  # unordered label pairs with s_jk > tau
    tau: float
    max_segment_size: int | None = None
    max_freq_ratio: float | None = None


@dataclass(frozen=True)
class Segmentation:
    """Labels split into segments; see SPEC section 2 for the fields.

    A classifier head can emit its logits in segment order (`reorder_head`); pass
    `segment_ordered()` to the loss together with such logits and targets permuted by
    `to_segment_order`: its `is_identity_order` is True, so the loss takes the
    identity-order fast path (no gather/scatter of the [B, C] logits and gradient).
    """

    num_labels: int
    order: torch.Tensor  # int64 [C]: original label id at each segment-ordered position
    offsets: torch.Tensor  # int64 [m+1]
    label_counts: torch.Tensor  # int64 [C]
    stats: SegmentationStats | None = None

    def __post_init__(self) -> None:
        # frozen, so the answer never changes: compute it once
        identity = bool(torch.equal(self.order.cpu(), torch.arange(self.num_labels)))
        object.__setattr__(self, "_is_identity_order", identity)
        # a constant of the segmentation; computing it per call would also break
        # torch.compile graphs (data-dependent output shape)
        sizes = self.offsets[1:] - self.offsets[:-1]
        object.__setattr__(self, "_segment_at_position",
                           torch.repeat_interleave(torch.arange(sizes.numel()), sizes))

    @property
    def num_segments(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def is_identity_order(self) -> bool:
        """True when order == arange(C): segment order is the original label order."""
        return self._is_identity_order

    @property
    def segment_sizes(self) -> torch.Tensor:
        """int64 [m]: number of labels in each segment."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def segment_at_position(self) -> torch.Tensor:
        """int64 [C]: segment of each segment-ordered position."""
        return self._segment_at_position

    def on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, offsets, segment_at_position) on `device`, copied there once and kept: a
        copy per loss call would be a blocking host-to-device transfer on GPUs."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_on_device", {})
        if device not in cache:
            cache[device] = tuple(t.to(device).contiguous() for t in (
                self.order, self.offsets, self._segment_at_position))
        return cache[device]

    @property
    def segment_of(self) -> torch.Tensor:
        out = torch.empty(self.num_labels, dtype=torch.int64)
        out[self.order] = self.segment_at_position
        return out

    @property
    def position_of(self) -> torch.Tensor:
        """int64 [C]: segment-ordered position of each original label (inverse of order)."""
        out = torch.empty(self.num_labels, dtype=torch.int64)
        out[self.order] = torch.arange(self.num_labels)
        return out

    @property
    def segment_count_range(self) -> torch.Tensor:
        """int64 [m, 2]: smallest and largest label count in each segment."""
        if self.num_segments == 0:
            return torch.zeros(0, 2, dtype=torch.int64)
        cnt = self.label_counts[self.order].numpy()
        starts = self.offsets[:-1].numpy()
        return torch.from_numpy(np.stack([np.minimum.reduceat(cnt, starts),
                                          np.maximum.reduceat(cnt, starts)], axis=1))

    def _density(self, pairs: int) -> float:
        all_pairs = self.num_labels * (self.num_labels - 1) // 2
        return pairs / all_pairs if all_pairs else 0.0

    @property
    def cooccurrence_density(self) -> float | None:
        """Share of label pairs that co-occur on some document (None without stats)."""
        return None if self.stats is None else self._density(self.stats.num_cooccurring_pairs)

    @property
    def conflict_density(self) -> float | None:
        """Share of label pairs that conflict at the segmentation's tau (None without stats)."""
        return None if self.stats is None else self._density(self.stats.num_conflicting_pairs)

    @classmethod
    def from_segments(cls, segments: list[list[int]], num_labels: int,
                      label_counts=None, stats: SegmentationStats | None = None
                      ) -> Segmentation:
        flat = [int(c) for s in segments for c in s]
        if any(len(s) == 0 for s in segments):
            raise ValueError("segments: every segment needs at least one label")
        if sorted(flat) != list(range(num_labels)):
            raise ValueError(
                f"segments: must hold every label id 0..{num_labels - 1} exactly once")
        sizes = torch.tensor([0] + [len(s) for s in segments], dtype=torch.int64)
        counts = (torch.zeros(num_labels, dtype=torch.int64) if label_counts is None
                  else torch.as_tensor(np.asarray(label_counts), dtype=torch.int64))
        if counts.shape != (num_labels,):
            raise ValueError(f"label_counts: expected shape ({num_labels},), got {tuple(counts.shape)}")
        return cls(num_labels, torch.tensor(flat, dtype=torch.int64), sizes.cumsum(0), counts,
                   stats)

    # -- segment-ordered label space -------------------------------------------------

    def segment_ordered(self) -> Segmentation:
        """The same segments over the permuted label space where label p is `order[p]`.

        order = arange(C), offsets unchanged, label_counts permuted: use it with a head
        from `reorder_head` and targets from `to_segment_order`.
        """
        return Segmentation(self.num_labels, torch.arange(self.num_labels),
                            self.offsets.clone(), self.label_counts[self.order].clone(),
                            self.stats)

    def reorder_head(self, linear: torch.nn.Linear, *, inplace: bool = False
                     ) -> torch.nn.Linear:
        """A Linear whose output p is the original head's output `order[p]`.

        Returns a permuted copy, or permutes `linear` itself with inplace=True (optimizer
        state held for its parameters, e.g. Adam moments, is then no longer aligned).
        """
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        if linear.out_features != self.num_labels:
            raise ValueError(f"linear: has {linear.out_features} outputs, the segmentation "
                             f"{self.num_labels} labels; pass the head whose outputs it "
                             "segments")
        head = linear if inplace else copy.deepcopy(linear)
        idx = self.order.to(head.weight.device)
        with torch.no_grad():
            head.weight.copy_(head.weight.index_select(0, idx))
            if head.bias is not None:
                head.bias.copy_(head.bias.index_select(0, idx))
        return head

    def to_segment_order(self, x, dim: int = -1):
        """Permute original-order label data (dense targets [B, C], weights [C], ...) along
        `dim` into segment order. A CSR pair (indptr, indices) gets its ids remapped."""
        return self._permute(x, dim, self.order, self.position_of, "x")

    def from_segment_order(self, x, dim: int = -1):
        """Inverse of `to_segment_order` (e.g. segment-ordered logits or probabilities back
        to original label ids)."""
        return self._permute(x, dim, self.position_of, self.order, "x")

    def _permute(self, x, dim: int, gather: torch.Tensor, remap: torch.Tensor, name: str):
        if isinstance(x, tuple) and len(x) == 2:
            indptr, indices = x
            return indptr, remap.to(indices.device)[indices.long()].to(indices.dtype)
        if isinstance(x, np.ndarray):
            return np.asarray(self._permute(torch.from_numpy(x), dim, gather, remap, name))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, array or (indptr, indices) pair, "
                            f"got {type(x).__name__}")
        if x.dim() == 0 or x.shape[dim] != self.num_labels:
            raise ValueError(f"{name}: expected {self.num_labels} labels along dim {dim}, "
                             f"got shape {tuple(x.shape)}")
        return x.index_select(dim, gather.to(x.device))

    # -- persistence and summary -----------------------------------------------------

    def save(self, path) -> None:
        extra = {}
        if self.stats is not None:
            extra = {f"stats_{f.name}": getattr(self.stats, f.name)
                     for f in fields(self.stats) if getattr(self.stats, f.name) is not None}
        np.savez(path, num_labels=self.num_labels, order=self.order.numpy(),
                 offsets=self.offsets.numpy(), label_counts=self.label_counts.numpy(), **extra)

    @classmethod
    def load(cls, path) -> Segmentation:
        with np.load(path) as d:
            stats = None
            if "stats_num_documents" in d.files:  # files from before the stats have none
                kw = {f.name: d[f"stats_{f.name}"].item() for f in fields(SegmentationStats)
                      if f"stats_{f.name}" in d.files}
                stats = SegmentationStats(**kw)
            return cls(int(d["num_labels"]), torch.from_numpy(d["order"]),
                       torch.from_numpy(d["offsets"]), torch.from_numpy(d["label_counts"]),
                       stats)

    def summary(self, max_segments: int = 20) -> str:
        sizes = self.segment_sizes
        lines = [f"Segmentation: {self.num_labels} labels in {self.num_segments} segments"]
        if self.num_segments:
            lines.append(f"  segment sizes: min {int(sizes.min())}, median "
                         f"{int(sizes.median())}, max {int(sizes.max())}")
        st = self.stats
        if st is not None:
            lines.append(f"  documents: {st.num_documents}, positives {st.num_positives}, "
                         f"at most {st.max_labels_per_document} labels on one document")
            lines.append(f"  co-occurring label pairs: {st.num_cooccurring_pairs} (graph "
                         f"density {self.cooccurrence_density:.3g}); conflicting at "
                         f"tau={st.tau:g}: {st.num_conflicting_pairs} "
                         f"(density {self.conflict_density:.3g})")
            lines.append(f"  caps: max_segment_size={st.max_segment_size}, "
                         f"max_freq_ratio={st.max_freq_ratio}")
        ranges = self.segment_count_range.tolist()
        for k, size in enumerate(sizes[:max_segments].tolist()):
            lines.append(f"  segment {k}: {size} labels, counts {ranges[k][0]}..{ranges[k][1]}")
        if len(sizes) > max_segments:
            lines.append(f"  ... {len(sizes) - max_segments} more")
        return "\n".join(lines)


# -- segmentation --------------------------------------------------------------------

def _check_args(num_labels, tau, max_segment_size, max_freq_ratio):
    def integer(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    def real(x):
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if not integer(num_labels) or num_labels < 1:
        raise ValueError(f"num_labels: must be a positive integer, got {num_labels!r}")
    if not real(tau) or not 0.0 <= tau < 1.0:
        raise ValueError(f"tau: must be in [0, 1), got {tau!r}")
    if max_segment_size is not None and (not integer(max_segment_size)
                                         or max_segment_size < 1):
        raise ValueError(f"max_segment_size: must be None or an integer >= 1, "
                         f"got {max_segment_size!r}")
    if max_freq_ratio is not None and (not real(max_freq_ratio) or math.isnan(max_freq_ratio)
                                       or max_freq_ratio < 1):
        # n_first >= n_c always, so a ratio below 1 would forbid any sharing
        raise ValueError(f"max_freq_ratio: must be None or a number >= 1, "
                         f"got {max_freq_ratio!r}")
    return (int(num_labels), float(tau),
            None if max_segment_size is None else int(max_segment_size),
            None if max_freq_ratio is None else float(max_freq_ratio))


def segment_labels(labels, num_labels: int, *, tau: float = 0.0,
                   max_segment_size: int | None = None,
                   max_freq_ratio: float | None = None) -> Segmentation:
    """Greedy segmentation of SPEC section 2 (Numba; same output as `segment_labels_python`).

    labels: scipy.sparse [N, C], dense 0/1 array or tensor [N, C], or a list of label-id
    lists. Memory is O(nnz of labels + conflicting pairs); labels are visited by
    descending count and each goes to the first segment it fits.
    """
    C, tau, max_segment_size, max_freq_ratio = _check_args(num_labels, tau, max_segment_size,
                                                           max_freq_ratio)
    indptr, indices = label_csr(labels, C)
    if indptr.size == 1:
        raise ValueError("labels: empty input; pass at least one document")
    cap = C + 1 if max_segment_size is None else max_segment_size
    ratio = math.inf if max_freq_ratio is None else max_freq_ratio
    order, offsets, counts, st = segment_csr(indptr, indices, C, tau, cap, ratio)
    stats = SegmentationStats(**st, tau=tau, max_segment_size=max_segment_size,
                              max_freq_ratio=max_freq_ratio)
    return Segmentation(C, torch.from_numpy(order), torch.from_numpy(offsets),
                        torch.from_numpy(counts), stats)


def _label_sets(labels, num_labels: int) -> list[list[int]]:
    indptr, indices = label_csr(labels, num_labels)
    if indptr.size == 1:  # np.split would return one empty row
        return []
    return [row.tolist() for row in np.split(indices, indptr[1:-1])]


def segment_labels_python(labels, num_labels: int, *, tau: float = 0.0,
                          max_segment_size: int | None = None,
                          max_freq_ratio: float | None = None) -> Segmentation:
    """Plain-Python greedy segmentation of SPEC section 2: the test oracle of
    `segment_labels` (O(N L^2) dict of pairs, O(C m) set intersections)."""
    C, tau, max_segment_size, max_freq_ratio = _check_args(num_labels, tau, max_segment_size,
                                                           max_freq_ratio)
    sets = _label_sets(labels, C)
    if not sets:
        raise ValueError("labels: empty input; pass at least one document")
    counts = np.zeros(num_labels, dtype=np.int64)
    pair: dict[tuple[int, int], int] = {}
    for row in sets:
        counts[row] += 1
        for a in range(len(row)):
            for b in range(a + 1, len(row)):
                pair[(row[a], row[b])] = pair.get((row[a], row[b]), 0) + 1
    conflicts: list[set[int]] = [set() for _ in range(num_labels)]
    for (j, k), mjk in pair.items():
        if mjk / min(counts[j], counts[k]) > tau:
            conflicts[j].add(k)
            conflicts[k].add(j)
    segments: list[list[int]] = []
    members: list[set[int]] = []
    for c in sorted(range(num_labels), key=lambda c: (-counts[c], c)):
        for s, seg in enumerate(segments):
            if conflicts[c] & members[s]:
                continue
            if max_segment_size is not None and len(seg) >= max_segment_size:
                continue
            if max_freq_ratio is not None and counts[seg[0]] / max(counts[c], 1) > max_freq_ratio:
                continue
            seg.append(c)
            members[s].add(c)
            break
        else:
            segments.append([c])
            members.append({c})
    stats = SegmentationStats(
        num_documents=len(sets), num_positives=sum(map(len, sets)),
        max_labels_per_document=max(map(len, sets)), num_cooccurring_pairs=len(pair),
        num_conflicting_pairs=sum(map(len, conflicts)) // 2, tau=tau,
        max_segment_size=max_segment_size, max_freq_ratio=max_freq_ratio)
    return Segmentation.from_segments(segments, num_labels, counts, stats)
