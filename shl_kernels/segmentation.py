"""The Segmentation container and the greedy segmentation of SPEC section 2."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Segmentation:
    """Labels split into segments; see SPEC section 2 for the fields."""

    num_labels: int
    order: torch.Tensor  # int64 [C]: original label id at each segment-ordered position
    offsets: torch.Tensor  # int64 [m+1]
    label_counts: torch.Tensor  # int64 [C]

    @property
    def num_segments(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def segment_at_position(self) -> torch.Tensor:
        """int64 [C]: segment of each segment-ordered position."""
        sizes = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_segments), sizes)

    @property
    def segment_of(self) -> torch.Tensor:
        out = torch.empty(self.num_labels, dtype=torch.int64)
        out[self.order] = self.segment_at_position
        return out

    @classmethod
    def from_segments(cls, segments: list[list[int]], num_labels: int,
                      label_counts=None) -> Segmentation:
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
        return cls(num_labels, torch.tensor(flat, dtype=torch.int64), sizes.cumsum(0), counts)

    def save(self, path: str) -> None:
        np.savez(path, num_labels=self.num_labels, order=self.order.numpy(),
                 offsets=self.offsets.numpy(), label_counts=self.label_counts.numpy())

    @classmethod
    def load(cls, path: str) -> Segmentation:
        d = np.load(path)
        return cls(int(d["num_labels"]), torch.from_numpy(d["order"]),
                   torch.from_numpy(d["offsets"]), torch.from_numpy(d["label_counts"]))

    def summary(self) -> str:
        sizes = (self.offsets[1:] - self.offsets[:-1]).tolist()
        lines = [f"Segmentation: {self.num_labels} labels in {self.num_segments} segments"]
        for k, size in enumerate(sizes[:20]):
            cnt = self.label_counts[self.order[self.offsets[k]:self.offsets[k + 1]]]
            lines.append(f"  segment {k}: {size} labels, counts {int(cnt.min())}..{int(cnt.max())}")
        if len(sizes) > 20:
            lines.append(f"  ... {len(sizes) - 20} more")
        return "\n".join(lines)


def _label_sets(labels, num_labels: int) -> list[list[int]]:
    if isinstance(labels, (list, tuple)):
        sets = [sorted({int(c) for c in row}) for row in labels]
    else:
        arr = np.asarray(labels.todense() if hasattr(labels, "todense") else labels)
        if arr.ndim != 2 or arr.shape[1] != num_labels:
            raise ValueError(f"labels: expected [N, {num_labels}], got shape {arr.shape}")
        sets = [np.flatnonzero(r).tolist() for r in arr]
    for row in sets:
        if row and (row[0] < 0 or row[-1] >= num_labels):
            raise ValueError(f"labels: label ids must be in [0, {num_labels}); got {row}")
    return sets


def segment_labels(labels, num_labels: int, *, tau: float = 0.0,
                   max_segment_size: int | None = None,
                   max_freq_ratio: float | None = None) -> Segmentation:
    """Greedy segmentation of SPEC section 2 (plain Python; a Numba version is planned)."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau: must be in [0, 1), got {tau}")
    sets = _label_sets(labels, num_labels)
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
    return Segmentation.from_segments(segments, num_labels, counts)
