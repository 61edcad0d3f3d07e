"""The thin trainer: a chunked transformers encoder fine-tuned with SHL (or a baseline loss)
on coding data, evaluated with the metrics of the medical-coding literature; the `shl-train`
command.

Steps: split train/validation/test; segment the training labels; optionally flag doubtful
training labels from the pretrained encoder's note embeddings (`find_noisy_labels`) and
ignore them in the loss; fine-tune; after every epoch tune the decision threshold on
validation (micro F1); report test metrics at the tuned threshold. SHL scores a code by
its segment softmax (`segment_probs`), the baselines by the sigmoid.

More than one GPU or machine: launch with torchrun (`torchrun --nproc-per-node 4 -m
shl_kernels.train ...`): every process trains on its share of each epoch's notes with
`DistributedDataParallel` (NCCL on GPUs, gloo on CPUs; batch_size is per process), all
evaluate the same validation and test notes, rank 0 writes the results.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import shl_kernels as shl

from .coding_model import ChunkedCodingModel
from .metrics import best_threshold, coding_metrics
from .notes_data import CodingData, builtin_notes, load_jsonl

__all__ = ["TrainConfig", "main", "train_and_evaluate"]

LOSSES = ("shl", "bce", "focal", "asl")


@dataclass
class TrainConfig:
    loss: str = "shl"
    beta: float = 0.5  # harmonic weight exponent (SHL); the quality study will set a default
    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-5  # encoder
    head_lr: float = 1e-3  # coding head (and SHL's null logits)
    chunk_tokens: int = 128
    max_chunks: int = 8
    encoder: str | None = None  # None: the bundled all-MiniLM-L6-v2
    backend: str = "auto"
    denoise: bool = False
    noise_k: int = 10
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r}")
        for name in ("epochs", "batch_size", "noise_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("lr, head_lr: learning rates must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")


def _targets(codes: list[list[int]], C: int, device) -> torch.Tensor:
    y = torch.zeros(len(codes), C, dtype=torch.bool)
    for i, cs in enumerate(codes):
        y[i, cs] = True
    return y.to(device)


class _Step(torch.nn.Module):
    """Model and loss in one module, so that DistributedDataParallel synchronises the
    gradients of SHL's null logits too."""

    def __init__(self, model: ChunkedCodingModel, crit: torch.nn.Module | None) -> None:
        super().__init__()
        self.model, self.crit = model, crit

    def forward(self, texts, targets, ignore, loss_fn):
        return loss_fn(self.model(texts), targets, ignore=ignore)


class _Objective:
    """The training loss and the matching code scores (probabilities)."""

    def __init__(self, cfg: TrainConfig, seg: shl.Segmentation, device) -> None:
        self.cfg, self.seg = cfg, seg
        self.crit = (shl.SegmentedHarmonicLoss(seg, beta=cfg.beta, backend=cfg.backend).to(device)
                     if cfg.loss == "shl" else None)

    def parameters(self):
        return list(self.crit.parameters()) if self.crit is not None else []

    def loss(self, logits, targets, ignore=None) -> torch.Tensor:
        if self.crit is not None:
            return self.crit(logits, targets, ignore=ignore)
        fn = {"bce": shl.bce_loss, "focal": shl.focal_loss, "asl": shl.asymmetric_loss}
        return fn[self.cfg.loss](logits, targets, ignore=ignore, backend=self.cfg.backend)

    @torch.no_grad()
    def scores(self, logits) -> torch.Tensor:
        if self.crit is not None:
            return shl.segment_probs(logits.float(), self.seg, self.crit.null_logits.float())
        return torch.sigmoid(logits.float())


@torch.no_grad()
def _predict(model, objective, data: CodingData, batch_size: int) -> np.ndarray:
    model.eval()
    out = [objective.scores(model(data.texts[s:s + batch_size]))
           for s in range(0, len(data.texts), batch_size)]
    model.train()
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def _embeddings(model, texts: list[str], batch_size: int) -> torch.Tensor:
    model.eval()
    out = torch.cat([model.embed(texts[s:s + batch_size]).cpu()
                     for s in range(0, len(texts), batch_size)])
    model.train()
    return out


def train_and_evaluate(data: CodingData, cfg: TrainConfig, out_dir: str | Path | None = None,
                       progress: bool = True) -> dict:
    """Fine-tunes and evaluates (see the module docstring). Returns (and writes
    out_dir/metrics.json and out_dir/curve.png) the config, the per-epoch history and the
    test metrics."""
    cfg.check()
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: set in main
    train, val, test = data.split(seed=cfg.seed)
    if min(len(train.texts), len(val.texts), len(test.texts)) == 0:
        raise ValueError(f"data: {len(data.texts)} notes are too few to split 70/15/15")
    C = data.num_labels
    seg = shl.segment_labels(train.codes, C)
    model = ChunkedCodingModel(C, cfg.encoder, chunk_tokens=cfg.chunk_tokens,
                               max_chunks=cfg.max_chunks).to(device)
    objective = _Objective(cfg, seg, device)
    report = None
    if cfg.denoise:
        emb = _embeddings(model, train.texts, 4 * cfg.batch_size)
        report = shl.find_noisy_labels(emb, train.codes, num_labels=C,
                                       k=min(cfg.noise_k, len(train.texts) - 1))
    opt = torch.optim.AdamW([
        {"params": model.encoder.parameters(), "lr": cfg.lr},
        {"params": [*model.head.parameters(), *objective.parameters()], "lr": cfg.head_lr}])
    step = _Step(model, objective.crit)
    rank, world = _dist_rank_world()
    if world > 1:
        step = torch.nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None)
    progress = progress and rank == 0
    y_val, y_test = _targets(val.codes, C, "cpu"), _targets(test.codes, C, "cpu")
    history = []
    rng = np.random.default_rng(cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        t0, losses = time.perf_counter(), []
        order = rng.permutation(len(train.texts))  # the same on every rank (same seed)
        # Every rank takes the same number of notes (DDP needs equal step counts); rank r
        # gets notes r, r + world, ...: together one batch of batch_size * world notes.
        order = order[: len(order) // world * world][rank::world]
        batches = range(0, len(order), cfg.batch_size)
        for s in tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress):
            idx = order[s:s + cfg.batch_size]
            targets = _targets([train.codes[i] for i in idx], C, device)
            ignore = None if report is None else report.ignore_rows(idx, device=device)
            loss = step([train.texts[i] for i in idx], targets, ignore, objective.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        p_val = _predict(model, objective, val, 4 * cfg.batch_size)
        threshold, val_f1 = best_threshold(p_val, y_val)
        history.append({"epoch": epoch, "train_loss": _mean_over_ranks(losses, device),
                        "val_micro_f1": val_f1, "threshold": threshold,
                        "seconds": time.perf_counter() - t0})
        if progress:
            print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, val micro F1 "
                  f"{val_f1:.4f} at threshold {threshold:.2f}")
    ks = tuple(k for k in (5, 8, 15) if k <= C)
    test_metrics = coding_metrics(_predict(model, objective, test, 4 * cfg.batch_size), y_test,
                                  threshold=history[-1]["threshold"], ks=ks)
    result = {"config": asdict(cfg), "num_labels": C, "num_segments": seg.num_segments,
              "notes": {"train": len(train.texts), "val": len(val.texts),
                        "test": len(test.texts)},
              "ignored_pairs": 0 if report is None else report.num_flagged,
              "truncated_tokens": model.truncated_tokens, "history": history,
              "test": test_metrics}
    if out_dir is not None and rank == 0:
        _write(result, Path(out_dir))
    return result


def _dist_rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(values: list[float], device: torch.device) -> float:
    """Mean of every rank's values (each rank has as many: equal step counts)."""
    t = torch.tensor([float(np.mean(values))], dtype=torch.float64, device=device)
    if _dist_rank_world()[1] > 1:
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return float(t)


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the plot is optional (pip install matplotlib)
    h = result["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ep = [r["epoch"] for r in h]
    ax.plot(ep, [r["train_loss"] for r in h], "o-", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_xticks(ep)
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    ax2.plot(ep, [r["val_micro_f1"] for r in h], "s-", color="tab:red", label="val micro F1")
    ax2.set_ylabel("validation micro F1")
    cfg = result["config"]
    ax.set_title(f"{cfg['loss']} loss, {result['num_labels']} codes: test micro F1 "
                 f"{result['test']['micro_f1']:.3f}")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.9), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="shl-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="builtin",
                   help='"builtin" (synthetic notes over real ICD-10-CM codes) or a JSONL file '
                        'of {"text": ..., "codes": [...]}')
    p.add_argument("--notes", type=int, default=600, help="builtin: number of notes")
    p.add_argument("--codes", type=int, default=60, help="builtin: number of codes")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="builtin: share of notes with one wrong or missing code")
    d = TrainConfig()
    for f, v in asdict(d).items():
        flag = "--" + f.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(v) if v is not None else str, default=v)
    p.add_argument("--out", default="runs/latest", help="metrics.json and curve.png go here")
    a = p.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():  # launched by torchrun
        gpu = torch.cuda.is_available() and a.device != "cpu"
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if gpu else "gloo")
    data = (builtin_notes(a.notes, a.codes, label_noise=a.label_noise, seed=a.seed)
            if a.data == "builtin" else load_jsonl(a.data))
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(d)})
    result = train_and_evaluate(data, cfg, a.out)
    if distributed:
        torch.distributed.destroy_process_group()
        if int(os.environ.get("RANK", "0")) != 0:
            return
    t = result["test"]
    print(f"test ({result['notes']['test']} notes, {result['num_labels']} codes, "
          f"{result['num_segments']} segments): micro F1 {t['micro_f1']:.4f}, macro F1 "
          f"{t['macro_f1']:.4f}, micro AUC {t['micro_auc']:.4f}, macro AUC "
          f"{t['macro_auc']:.4f}, P@5 {t.get('precision@5', float('nan')):.4f}; "
          f"written to {a.out}/")


if __name__ == "__main__":
    main()
