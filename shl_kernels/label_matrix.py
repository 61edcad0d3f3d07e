"""Training label sets of any accepted form -> canonical CSR (SPEC section 2 input)."""
from __future__ import annotations

from itertools import chain

import numpy as np
import scipy.sparse as sp
import torch

from .segment_numba import serial_if_small, sort_unique_rows


def label_csr(labels, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr int64 [N+1], indices [nnz]): each document's label ids, sorted, unique.

    indices are int32 (int64 only for num_labels >= 2**31; a scipy matrix's own int64 ids
    are kept, as converting them costs more than the kernels save on them): half the
    memory traffic of int64 in the segmentation kernels.

    `labels`: scipy.sparse [N, C] (nonzero entries are labels), dense 0/1 array or tensor
    [N, C], or a list of label-id lists. The input is never modified.
    """
    if sp.issparse(labels):
        return _from_sparse(labels, num_labels)
    if isinstance(labels, (list, tuple)):
        return _from_lists(labels, num_labels)
    return _from_dense(labels, num_labels)


def _index_dtype(num_labels: int):
    return np.int32 if num_labels <= np.iinfo(np.int32).max else np.int64


def _check_shape(shape: tuple, num_labels: int) -> None:
    if len(shape) != 2 or shape[1] != num_labels:
        raise ValueError(f"labels: expected [N, {num_labels}], got shape {tuple(shape)}")


def _from_sparse(labels, num_labels: int):
    _check_shape(labels.shape, num_labels)
    csr = labels if labels.format == "csr" else labels.tocsr()
    if not (csr.has_canonical_format and csr.data.all()):
        csr = sp.csr_array(csr, copy=True)  # our own copy: canonicalising works in place
        csr.sum_duplicates()  # as in the dense view: duplicates add up; sorts the rows
        csr.eliminate_zeros()  # stored zeros are not labels
    return csr.indptr.astype(np.int64), csr.indices  # scipy ids: int32 or int64


def _from_dense(labels, num_labels: int):
    if isinstance(labels, torch.Tensor):
        arr = (labels.detach() != 0).cpu().numpy()
    else:
        arr = np.asarray(labels)
    _check_shape(arr.shape, num_labels)
    rows, cols = np.nonzero(arr)  # row-major: each row's ids come out sorted
    indptr = np.zeros(arr.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=arr.shape[0]), out=indptr[1:])
    return indptr, cols.astype(_index_dtype(num_labels))


def _from_lists(labels, num_labels: int):
    rows = [r if hasattr(r, "__len__") else list(r) for r in labels]
    try:
        lens = np.fromiter(map(len, rows), np.int64, count=len(rows))
        flat = np.fromiter(chain.from_iterable(rows), np.int64, count=int(lens.sum()))
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"labels: label ids must be integers in [0, {num_labels}) ({e})") from e
    if flat.size and (flat.min() < 0 or flat.max() >= num_labels):
        bad = flat[(flat < 0) | (flat >= num_labels)][0]
        raise ValueError(f"labels: label ids must be in [0, {num_labels}); got {bad}")
    indptr = np.zeros(lens.size + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    with serial_if_small(flat.size):
        return sort_unique_rows(indptr, flat.astype(_index_dtype(num_labels)))
