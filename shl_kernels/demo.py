"""Main job until the trainer exists: long-tailed labels -> segments -> loss per backend ->
doubtful labels (noise detection) ignored by the loss."""
from __future__ import annotations

import torch

import shl_kernels as shl


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    N, C = 2000, 300
    freq = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** 1.1  # Zipf-like
    docs = [torch.multinomial(freq, 6, generator=gen).tolist() for _ in range(N)]
    seg = shl.segment_labels(docs, C, tau=0.0)
    print(seg.summary())
    B = 64
    z = torch.randn(B, C, generator=gen)
    y = torch.zeros(B, C)
    for i, d in enumerate(docs[:B]):
        y[i, d] = 1
    w = shl.harmonic_weights(seg.label_counts, beta=0.5)
    ref_grad = None
    for backend in shl.available_backends():  # "torch" (the reference) comes first
        zz = z.clone().requires_grad_()
        loss = shl.segmented_harmonic_loss(zz, y, seg, label_weights=w, backend=backend)
        loss.backward()
        ref_grad = zz.grad if ref_grad is None else ref_grad
        diff = (zz.grad - ref_grad).abs().max().item()
        print(f"backend={backend:<7} loss={loss.item():.6f} grad_norm={zz.grad.norm():.6f} "
              f"max|grad - torch grad|={diff:.2e}")

    # Stand-in document embeddings (a trained encoder's would go here): the sum of random
    # per-label vectors plus noise, so documents sharing labels are neighbours.
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("noise detection skipped: pip install faiss-cpu")
        return
    vec = torch.randn(C, 64, generator=gen)
    emb = torch.stack([vec[d].sum(0) for d in docs]) + 0.5 * torch.randn(N, 64, generator=gen)
    report = shl.find_noisy_labels(emb, docs, num_labels=C, k=30)
    print(report.summary(top=5))
    ignore = report.ignore_rows(range(B))
    loss = shl.segmented_harmonic_loss(z, y, seg, label_weights=w, ignore=ignore)
    print(f"loss with the {int(ignore[0][-1])} flagged pairs of this batch ignored: "
          f"{loss.item():.6f}")


if __name__ == "__main__":
    main()
