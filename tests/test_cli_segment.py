"""shl-segment end to end on tiny generated files, and the frequency plot."""
import json
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import shl_kernels as shl
from shl_kernels.cli_segment import main, read_jsonl

DOCS = [[0, 3], [3, 1], [], [0, 1, 2], [4], [0, 4, 1]]
C = 6


def _jsonl(path, docs=DOCS):
    lines = [json.dumps(d) for d in docs]
    lines.insert(2, "")  # blank lines are skipped
    lines[3] = json.dumps({"labels": docs[2], "id": "note-3"})
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_to_npz_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src, out, png = _jsonl(tmp_path / "labels.jsonl"), tmp_path / "seg.npz", tmp_path / "f.png"
    assert read_jsonl(str(src), progress=False) == DOCS
    rc = main([str(src), "--num-labels", str(C), "--tau", "0.2", "--max-segment-size", "3",
               "--max-freq-ratio", "5", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "reading" in captured.err  # the tqdm progress bar
    want = shl.segment_labels(DOCS, C, tau=0.2, max_segment_size=3, max_freq_ratio=5.0)
    assert want.summary() in text and "saved" in text
    got = shl.Segmentation.load(out)
    assert torch.equal(got.order, want.order) and torch.equal(got.offsets, want.offsets)
    assert got.stats == want.stats
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparse_npz_input(tmp_path, capsys):
    X = np.zeros((len(DOCS), C), np.int8)
    for i, d in enumerate(DOCS):
        X[i, d] = 1
    sp.save_npz(tmp_path / "labels.npz", sp.csr_array(X))
    assert main([str(tmp_path / "labels.npz"), "--num-labels", str(C),
                 "--out", str(tmp_path / "seg")]) == 0
    got = shl.Segmentation.load(tmp_path / "seg.npz")  # ".npz" added like np.savez does
    assert torch.equal(got.order, shl.segment_labels(DOCS, C).order)
    assert f"{C} labels in" in capsys.readouterr().out


@pytest.mark.parametrize("content, args, match", [
    ("[0, 9]\n", [], "labels"),
    ("[0, 1\n", [], "line 1|:1:"),
    ('"x"\n', [], "list of label ids"),
    ("[0]\n", ["--tau", "1.5"], "tau"),
    ("", [], "empty"),
])
def test_errors_exit_2(tmp_path, capsys, content, args, match):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    rc = main([str(src), "--num-labels", str(C), "--out", str(tmp_path / "s.npz"),
               "--quiet", *args])
    assert rc == 2
    assert re.search(match, capsys.readouterr().err)


def test_missing_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl"), "--num-labels", "3", "--out",
                 str(tmp_path / "s.npz")]) == 2
    assert "error" in capsys.readouterr().err


def test_plot_many_segments_and_unseen(tmp_path):
    pytest.importorskip("matplotlib")
    from shl_kernels.segment_plot import plot_segments

    rng = np.random.default_rng(0)
    docs = [rng.choice(60, size=8, replace=False).tolist() for _ in range(50)]
    seg = shl.segment_labels(docs, 80)  # > 10 segments, 20+ unseen labels
    assert seg.num_segments > 10
    plot_segments(seg, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
