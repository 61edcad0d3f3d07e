"""The losses inside torch.compile'd code: the fused backends run eagerly behind one graph
break each (no warnings, no tracing into the checks or the native calls) and give the same
loss and gradients as without compile. Dynamo only (backend="eager"): what is tested is how
the code meets the tracer, not Inductor's code generation."""
from __future__ import annotations

import warnings

import pytest
import torch

import shl_kernels as shl

FUSED = [b for b in shl.available_backends() if b != "torch"]


def _problem(device: str):
    gen = torch.Generator().manual_seed(0)
    C = 40
    ids = torch.randperm(C, generator=gen).tolist()
    seg = shl.Segmentation.from_segments([ids[:25], ids[25:31], ids[31:32], ids[32:]], C)
    return (seg, torch.randn(6, 16, generator=gen).to(device),
            (torch.rand(6, C, generator=gen) < 0.2).to(device),
            (torch.rand(C, generator=gen) + 0.5).to(device))


def _losses(backend: str, seg, targets, w):
    return {
        "shl": lambda z, eta: shl.segmented_harmonic_loss(z, targets, seg, label_weights=w,
                                                          null_logits=eta, backend=backend),
        "bce": lambda z, eta: shl.bce_loss(z, targets, backend=backend),
        "focal": lambda z, eta: shl.focal_loss(z, targets, backend=backend),
        "asl": lambda z, eta: shl.asymmetric_loss(z, targets, backend=backend),
    }


@pytest.mark.parametrize("loss", ["shl", "bce", "focal", "asl"])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_losses_in_compiled_code(backend, loss):
    # GPU backends on CUDA tensors where there is a GPU (else Triton's CPU interpreter)
    device = "cuda" if backend != "cpu" and torch.cuda.is_available() else "cpu"
    seg, x, targets, w = _problem(device)
    torch.manual_seed(1)
    head = torch.nn.Linear(16, seg.num_labels).to(device)
    eta = torch.zeros(seg.num_segments, device=device, requires_grad=True)
    fn = _losses(backend, seg, targets, w)[loss]

    def step(x):
        return fn(head(x) * 2.0, eta)

    out = {}
    for name, f in (("eager", step), ("compiled", torch.compile(step, backend="eager"))):
        head.zero_grad()
        eta.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = f(x)
        # Dynamo warns where it cannot trace a call (a native function, a cached one)
        assert not [w for w in caught if "Dynamo" in str(w.message)], \
            [str(w.message)[:200] for w in caught]
        value.backward()
        out[name] = [value.detach(), head.weight.grad.clone(),
                     torch.zeros((), device=device) if eta.grad is None else eta.grad.clone()]
    for a, b in zip(out["compiled"], out["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x)
    # the only break: the fused loss, run outside the graph
    assert explained.graph_break_count <= 1
    assert all("disable" in str(b.reason) for b in explained.break_reasons)


def test_backend_errors_are_plain_value_errors_in_compiled_code():
    """An unavailable backend (or one for the other device) raises the eager ValueError, not
    a Dynamo error wrapping it."""
    seg, _, targets, _ = _problem("cpu")
    z = torch.randn(6, seg.num_labels, requires_grad=True)
    fn = torch.compile(lambda z: shl.segmented_harmonic_loss(z, targets, seg, backend="cuda"),
                       backend="eager")
    with pytest.raises(ValueError, match="^backend: 'cuda'"):
        fn(z)


@pytest.mark.parametrize("form", ["float", "csr"])
@pytest.mark.parametrize("backend", [*FUSED, "torch"])
def test_target_forms_in_compiled_code(backend, form):
    # Float and CSR targets are converted and checked with native calls and host reads:
    # behind a graph break without Dynamo warnings, with the loss of bool targets.
    device = "cuda" if backend not in ("cpu", "torch") and torch.cuda.is_available() else "cpu"
    seg, _, targets, w = _problem(device)
    if form == "float":
        given = targets.float()
    else:
        cols = targets.nonzero(as_tuple=True)[1]
        given = (torch.cat([torch.zeros(1, dtype=torch.int64, device=device),
                            targets.sum(1).cumsum(0)]), cols)
    z = torch.randn(6, seg.num_labels, device=device)

    def loss(z, t):
        return shl.segmented_harmonic_loss(z, t, seg, label_weights=w, backend=backend)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(loss, backend="eager")(z, given)
    assert not [w for w in caught if "Dynamo" in str(w.message)], \
        [str(w.message)[:200] for w in caught]
    torch.testing.assert_close(got, loss(z, targets), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
