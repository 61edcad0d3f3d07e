"""Noise detection (SPEC section 4, `find_noisy_labels`): (document, label) pairs whose
label disagrees with the document's nearest neighbours in embedding space.

Each document's k nearest other documents are found with FAISS (exact inner-product or L2
search; on GPUs when FAISS was built with them). For every label, the number of neighbours
carrying it is compared with what k documents drawn at random would give (hypergeometric,
the label's frequency among the other documents):

- a *suspect positive* is a label the document has but its neighbours carry so rarely that
  chance alone would give at most that few with probability <= alpha (a common code that
  none of the similar notes has). Rare labels are never suspects: k random documents would
  not carry them either, which is the long tail SHL is made for;
- a *suspect missing* label is one the document lacks while at least `min_agreement` of its
  neighbours carry it and chance would give that many with probability <= alpha.

The flagged pairs become the loss's `ignore` (neither rewarded nor penalised), as
`report.ignore` (CSR over all documents) or `report.ignore_rows(batch_ids)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import gammaln
from tqdm.auto import tqdm

from .label_matrix import label_csr

__all__ = ["NoiseReport", "find_noisy_labels"]

_FLAGS = ("both", "positives", "missing")
_METRICS = ("cosine", "ip", "l2")


@dataclass
class NoiseReport:
    """Result of `find_noisy_labels`. Pairs are (document, label) rows, sorted."""

    num_labels: int
    k: int
    alpha: float
    flag: str
    neighbors: np.ndarray  # int64 [N, k]: nearest other documents, closest first
    scores: np.ndarray  # float32 [N, k]: similarity (cosine/ip) or -squared distance (l2)
    suspect_positive: np.ndarray  # int64 [n, 2]: labels given, neighbours lack them
    positive_pvalue: np.ndarray  # float64 [n]
    suspect_missing: np.ndarray  # int64 [n, 2]: labels absent, neighbours agree on them
    missing_pvalue: np.ndarray  # float64 [n]
    _csr: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parts = ([self.suspect_positive] if self.flag in ("both", "positives") else []) + \
                ([self.suspect_missing] if self.flag in ("both", "missing") else [])
        pairs = np.concatenate(parts) if parts else np.empty((0, 2), np.int64)
        pairs = np.unique(pairs, axis=0)  # sorted by document, then label
        indptr = np.zeros(self.num_docs + 1, np.int64)
        np.cumsum(np.bincount(pairs[:, 0], minlength=self.num_docs), out=indptr[1:])
        self._csr = (indptr, pairs[:, 1].copy())

    @property
    def num_docs(self) -> int:
        return len(self.neighbors)

    @property
    def num_flagged(self) -> int:
        return len(self._csr[1])

    @property
    def ignore(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The flagged pairs of every document as a CSR (indptr, indices) pair: the loss's
        `ignore` when a batch holds all documents in order (else see `ignore_rows`)."""
        return tuple(torch.from_numpy(a.copy()) for a in self._csr)

    def ignore_rows(self, rows, device: torch.device | str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR `ignore` for a batch: `rows` are the batch's document ids (in batch order)."""
        rows = torch.as_tensor(rows).long().cpu().numpy()
        if rows.ndim != 1:
            raise ValueError(f"rows: expected 1-D document ids, got shape {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_docs):
            raise ValueError(f"rows: document ids must be in [0, {self.num_docs})")
        indptr, indices = self._csr
        starts, lengths = indptr[rows], indptr[rows + 1] - indptr[rows]
        out_ptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=out_ptr[1:])
        take = np.repeat(starts - out_ptr[:-1], lengths) + np.arange(out_ptr[-1])
        return (torch.from_numpy(out_ptr).to(device),
                torch.from_numpy(indices[take]).to(device))

    def summary(self, label_names: list[str] | None = None, top: int = 10) -> str:
        """Counts, and the labels flagged most often of each kind."""
        n, c = self.num_docs, self.num_labels
        head = (f"{n} documents, {c} labels, k={self.k}, alpha={self.alpha}: "
                f"{len(self.suspect_positive)} suspect positives, "
                f"{len(self.suspect_missing)} suspect missing labels; "
                f"{self.num_flagged} pairs ignored (flag={self.flag!r})")
        lines = [head]
        for name, pairs in (("suspect positives", self.suspect_positive),
                            ("suspect missing", self.suspect_missing)):
            if not len(pairs):
                continue
            counts = np.bincount(pairs[:, 1], minlength=c)
            best = np.argsort(-counts, kind="stable")[:top]
            names = [f"{label_names[j] if label_names else j} ({counts[j]})"
                     for j in best if counts[j]]
            lines.append(f"  most {name}: " + ", ".join(names))
        return "\n".join(lines)


def _embeddings(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.array(x, dtype=np.float32, order="C", copy=True)  # our copy: normalised in place
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"embeddings: expected [N, d] with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings: must be finite (found NaN or inf)")
    return x


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("find_noisy_labels needs FAISS: pip install faiss-cpu (or faiss-gpu "
                          "from conda for GPU search)") from e
    return faiss


def _neighbors(x: np.ndarray, k: int, metric: str, device: str, batch_size: int,
               progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """k nearest other documents of every document (exact search), closest first."""
    faiss = _faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and gpus == 0:
        raise ValueError("device: 'cuda' asked, but this FAISS has no GPU support; install "
                         "faiss-gpu or pass device='cpu'")
    if metric == "cosine":
        faiss.normalize_L2(x)
    index = faiss.IndexFlatL2(x.shape[1]) if metric == "l2" else faiss.IndexFlatIP(x.shape[1])
    if gpus and device != "cpu":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    n = len(x)
    ids = np.empty((n, k), np.int64)
    scores = np.empty((n, k), np.float32)
    for s in tqdm(range(0, n, batch_size), desc="neighbours", unit="batch", disable=not progress):
        e = min(s + batch_size, n)
        d, i = index.search(x[s:e], k + 1)
        # Drop the document itself: usually first, but an exact duplicate may rank before
        # it; where it is absent (ties), drop the farthest instead.
        drop = i == np.arange(s, e)[:, None]
        drop[~drop.any(1), -1] = True
        keep = ~drop
        ids[s:e] = i[keep].reshape(e - s, k)
        scores[s:e] = (-d if metric == "l2" else d)[keep].reshape(e - s, k)
    return ids, scores


def _check(k, n, alpha, min_agreement, flag, metric, device, batch_size) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < n:
        raise ValueError(f"k: expected an integer in [1, {n - 1}] (N - 1 other documents), "
                         f"got {k!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a p-value threshold in (0, 1), got {alpha!r}")
    if not 0 < min_agreement <= 1:
        raise ValueError(f"min_agreement: expected a fraction in (0, 1], got {min_agreement!r}")
    if flag not in _FLAGS:
        raise ValueError(f"flag: expected one of {_FLAGS}, got {flag!r}")
    if metric not in _METRICS:
        raise ValueError(f"metric: expected one of {_METRICS}, got {metric!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")


def find_noisy_labels(embeddings, labels, *, k: int = 10, num_labels: int | None = None,
                      alpha: float = 0.01, min_agreement: float = 0.5, flag: str = "both",
                      metric: str = "cosine", device: str = "auto", batch_size: int = 4096,
                      progress: bool | None = None) -> NoiseReport:
    """Flag doubtful (document, label) pairs by the labels of each document's k nearest
    neighbours (see the module docstring); `report.ignore` feeds the loss.

    embeddings: [N, d] (numpy or torch, any device), one row per document, e.g. the
    encoder's pooled output. labels: the documents' labels in any form `segment_labels`
    takes (list of label-id lists, dense 0/1 [N, C], scipy sparse); num_labels C is
    required for lists. alpha: p-value threshold of both tests. min_agreement: fraction of
    neighbours that must carry a label before its absence is suspect. flag: which suspects
    go into `ignore` ("both", "positives", "missing"). metric: "cosine" (default), "ip" or
    "l2". device: "auto" (FAISS GPUs when present), "cpu" or "cuda". progress: a tqdm bar
    over the neighbour search (default: from 20,000 documents on). Inputs are not modified.
    """
    x = _embeddings(embeddings)
    n = len(x)
    _check(k, n, alpha, min_agreement, flag, metric, device, batch_size)
    if num_labels is None:
        if isinstance(labels, (list, tuple)):
            raise ValueError("num_labels: required when labels are lists of label ids")
        num_labels = int(labels.shape[1])
    indptr, indices = label_csr(labels, num_labels)
    if len(indptr) - 1 != n:
        raise ValueError(f"labels: {len(indptr) - 1} documents, embeddings {n}")

    if progress is None:
        progress = n >= 20_000
    ids, scores = _neighbors(x, k, metric, device, batch_size, progress)
    y = sp.csr_array((np.ones(len(indices), np.int32), indices, indptr), shape=(n, num_labels))
    freq = np.bincount(indices, minlength=num_labels)
    # P-value tables per label; among the N - 1 other documents, a document's own label is
    # carried by freq - 1 of them, a label it lacks by freq.
    cdf_pos = _hypergeom_cdf(n - 1, freq - 1, k)  # [:, j] = P(count <= j)
    sf_miss = _hypergeom_sf(n - 1, freq, k)  # [:, j] = P(count >= j)
    need = max(1, math.ceil(min_agreement * k - 1e-9))
    found = {"pos": [], "miss": []}
    # Neighbour label counts block by block: memory O(batch_size * k * labels per doc).
    for s0 in range(0, n, batch_size):
        s1 = min(s0 + batch_size, n)
        rows = s1 - s0
        nb = sp.csr_array((np.ones(rows * k, np.int32), ids[s0:s1].ravel(),
                           np.arange(0, rows * k + 1, k)), shape=(rows, n))
        yb = y[s0:s1]
        counts = (nb @ y).tocsr()  # [rows, C] neighbours carrying each label
        # Counts at every positive, zeros included: (counts + yb) holds count + 1 there.
        at_pos = (counts + yb).multiply(yb).tocoo()
        doc, lab, cnt = at_pos.row, at_pos.col, at_pos.data - 1
        p = cdf_pos[lab, cnt]
        sel = p <= alpha
        found["pos"].append((doc[sel] + s0, lab[sel], p[sel]))
        # Labels the document lacks, carried by >= min_agreement of its neighbours.
        absent = (counts - counts.multiply(yb)).tocoo()
        ok = absent.data >= need
        doc, lab, cnt = absent.row[ok], absent.col[ok], absent.data[ok]
        p = sf_miss[lab, cnt]
        sel = p <= alpha
        found["miss"].append((doc[sel] + s0, lab[sel], p[sel]))
    pos_pairs, p_pos = _sorted_pairs(*(np.concatenate(v) for v in zip(*found["pos"])))
    miss_pairs, p_miss = _sorted_pairs(*(np.concatenate(v) for v in zip(*found["miss"])))

    return NoiseReport(num_labels=num_labels, k=k, alpha=alpha, flag=flag, neighbors=ids,
                       scores=scores, suspect_positive=pos_pairs, positive_pvalue=p_pos,
                       suspect_missing=miss_pairs, missing_pvalue=p_miss)


def _hypergeom_pmf(total: int, carriers: np.ndarray, k: int) -> np.ndarray:
    """[len(carriers), k + 1]: P(j of k documents drawn from `total` carry the label), for
    each label's number of carriers: one table per call instead of a scipy call per pair
    (counts never exceed k)."""
    j = np.arange(k + 1)[None, :]
    a = carriers.astype(np.float64)[:, None]

    def log_comb(n, r):
        ok = (r >= 0) & (r <= n)
        r0, s0 = np.where(ok, r, 0), np.where(ok, n - r, 0)
        return np.where(ok, gammaln(n + 1) - gammaln(r0 + 1) - gammaln(s0 + 1), -np.inf)

    return np.exp(log_comb(a, j) + log_comb(total - a, k - j) - log_comb(float(total), k))


def _hypergeom_cdf(total: int, carriers: np.ndarray, k: int) -> np.ndarray:
    return np.minimum(np.cumsum(_hypergeom_pmf(total, carriers, k), axis=1), 1.0)


def _hypergeom_sf(total: int, carriers: np.ndarray, k: int) -> np.ndarray:
    """[:, j] = P(count >= j), summed from the tail (small tails keep their precision)."""
    pmf = _hypergeom_pmf(total, carriers, k)
    return np.minimum(np.cumsum(pmf[:, ::-1], axis=1)[:, ::-1], 1.0)


def _sorted_pairs(doc, lab, p) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((lab, doc))
    pairs = np.stack([doc[order], lab[order]], 1).astype(np.int64).reshape(-1, 2)
    return pairs, np.asarray(p, np.float64)[order]
