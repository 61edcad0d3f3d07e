import random

import numpy as np
import pytest

import shl_kernels as shl


@pytest.mark.parametrize("seed", range(20))
def test_spec_properties_random(seed):
    rng = random.Random(seed)
    C = rng.randint(1, 25)
    docs = [rng.sample(range(C), rng.randint(0, min(C, 5))) for _ in range(rng.randint(1, 40))]
    seg = shl.segment_labels(docs, C, tau=0.0)
    assert sorted(seg.order.tolist()) == list(range(C))
    assert seg.num_segments >= max(len(d) for d in docs)
    for d in docs:
        s = seg.segment_of[d].tolist()
        assert len(s) == len(set(s))
    again = shl.segment_labels(docs, C, tau=0.0)
    assert seg.order.tolist() == again.order.tolist()
    assert seg.offsets.tolist() == again.offsets.tolist()
    cap = shl.segment_labels(docs, C, max_segment_size=2, max_freq_ratio=3.0)
    assert int((cap.offsets[1:] - cap.offsets[:-1]).max()) <= 2
    dense = np.zeros((len(docs), C))
    for i, d in enumerate(docs):
        dense[i, d] = 1
    assert shl.segment_labels(dense, C).order.tolist() == seg.order.tolist()


def test_bad_segmentation_input():
    with pytest.raises(ValueError, match="labels"):
        shl.segment_labels([[0, 7]], 3)
    with pytest.raises(ValueError, match="labels"):
        shl.segment_labels([[-1]], 3)
    with pytest.raises(ValueError, match="tau"):
        shl.segment_labels([[0]], 3, tau=1.0)
    with pytest.raises(ValueError, match="empty"):
        shl.segment_labels([], 3)
