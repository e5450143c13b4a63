"""fused_linear_kd_loss / fused_linear_topk against the same losses on materialised logits:
values and the gradients of hidden, weight and bias."""

from __future__ import annotations

import pytest
import torch
from conftest import device_for, kernel_backends
from helpers import LOSS_FLOOR, assert_close, logits

import distill_ops
from distill_ops import reference

BACKENDS = kernel_backends()


def head(n, h, v, dtype=torch.float64, device="cpu", scale=0.3):
    return (torch.randn(*n, h, dtype=torch.float64, device=device).to(dtype),
            (torch.randn(v, h, dtype=torch.float64, device=device) * scale).to(dtype),
            (torch.randn(v, dtype=torch.float64, device=device) * 0.1).to(dtype))


def run(backend, hs, ws, bs, teacher, ref_fn, dtype=torch.float32, **kw):
    """Ours on `dtype` copies vs the reference on float64 materialised logits, same
    grad_output; returns (loss, ref, grads, ref_grads)."""
    ours = [x.to(dtype).clone().requires_grad_() if x is not None else None
            for x in (hs, ws, bs)]
    loss = distill_ops.fused_linear_kd_loss(ours[0], ours[1], *teacher.get("dense", ()),
                                            student_bias=ours[2], backend=backend,
                                            **teacher.get("sparse", {}), **kw)
    go = torch.rand_like(loss) + 0.5
    loss.backward(go)
    ref_in = [x.to(dtype).double().clone().requires_grad_() if x is not None else None
              for x in (hs, ws, bs)]
    logits = ref_in[0] @ ref_in[1].T
    if ref_in[2] is not None:
        logits = logits + ref_in[2]
    ref = ref_fn(logits, **{k: v for k, v in kw.items() if k != "chunk_size"})
    ref.backward(go.double())
    grads = [x.grad for x in ours if x is not None]
    ref_grads = [x.grad for x in ref_in if x is not None]
    return loss, ref, grads, ref_grads


def dense_teacher(ht, wt, dtype=torch.float32):
    return {"dense": (ht.to(dtype), wt.to(dtype))}, (lambda logits, **kw: reference.kd_loss(
        logits, ht.to(dtype).double() @ wt.to(dtype).double().T, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 4, 7])
def test_dense_teacher_matches_materialised_logits(seed, backend, divergence, reduction,
                                                   chunk_size):
    dev = device_for(backend)
    hs, ws, bs = head((3, 7), 16, 300, device=dev)
    ht, wt, _ = head((3, 7), 24, 300, device=dev)
    labels = torch.randint(0, 300, (3, 7), device=dev)
    labels[0, :3] = -100
    teacher, ref_fn = dense_teacher(ht, wt)
    loss, ref, grads, ref_grads = run(
        backend, hs, ws, bs, teacher, ref_fn, divergence=divergence, temperature=2.0,
        labels=labels, hard_weight=0.3, reduction=reduction, chunk_size=chunk_size)
    assert_close(loss, ref, 1e-5, "loss", LOSS_FLOOR)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(g, r, 1e-5, name)
    assert (grads[0][0, :3] == 0).all()  # ignored rows: never projected, zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm", "support", "none"])
def test_sparse_targets_match_materialised_logits(seed, backend, tail):
    dev = device_for(backend)
    hs, ws, bs = head((2, 9), 12, 200, device=dev)
    t_logits = torch.randn(2, 9, 200, dtype=torch.float64, device=dev) * 2
    top = reference.topk_logprobs(t_logits, 16, temperature=1.5)
    mask = torch.rand(2, 9, device=dev) > 0.3
    teacher = {"sparse": {"teacher_indices": top[0], "teacher_logprobs": top[1].float()}}

    def ref_fn(logits, **kw):
        return reference.sparse_kd_loss(logits, top[0], top[1].float().double(), **kw)

    loss, ref, grads, ref_grads = run(
        backend, hs, ws, bs, teacher, ref_fn, tail=tail, divergence="jsd", temperature=2.0,
        source_temperature=1.5, mask=mask, chunk_size=5)
    assert_close(loss, ref, 1e-5, "loss", LOSS_FLOOR)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(g, r, 1e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_head_is_projected_in_fp32(seed, backend):
    """bf16 hidden states and weights: the logits are computed from the bf16 values in fp32
    and never rounded to bf16, so the loss matches the float64 reference on those values."""
    dev = device_for(backend)
    hs, ws, bs = head((11,), 32, 400, device=dev)
    ht, wt, _ = head((11,), 32, 400, device=dev)
    teacher, ref_fn = dense_teacher(ht, wt, torch.bfloat16)
    loss, ref, grads, ref_grads = run(backend, hs, ws, bs, teacher, ref_fn,
                                      dtype=torch.bfloat16, temperature=1.0)
    assert_close(loss, ref, 1e-5, "loss", LOSS_FLOOR)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert g.dtype == torch.bfloat16
        assert_close(g, r, 1e-2, name)


def test_options_softcap_vocab_size_no_bias_num_items(seed):
    hs, ws, _ = head((10,), 8, 120)
    ht, wt, _ = head((10,), 8, 128)  # a padded teacher head
    labels = torch.randint(0, 110, (10,))
    kw = dict(divergence="forward_kl", temperature=1.3, vocab_size=110, student_softcap=5.0,
              teacher_softcap=8.0, student_logit_scale=0.9, labels=labels, hard_weight=0.5,
              num_items_in_batch=25, scale_by_t2=True)
    teacher, ref_fn = dense_teacher(ht, wt)
    loss, ref, grads, ref_grads = run("cpu", hs, ws, None, teacher, ref_fn, chunk_size=3, **kw)
    assert_close(loss, ref, 1e-5, "loss", LOSS_FLOOR)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, 1e-5, "grad")


def test_all_rows_ignored(seed):
    hs, ws, _ = head((4,), 8, 50)
    ht, wt, _ = head((4,), 8, 50)
    a = hs.float().requires_grad_()
    loss = distill_ops.fused_linear_kd_loss(a, ws.float(), ht.float(), wt.float(),
                                            labels=torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and (a.grad == 0).all()


def test_default_chunk_keeps_buffers_under_256_mib():
    from distill_ops.backends.head_matmul import tile_rows
    from distill_ops.fused_linear import default_chunk_size

    for dtype in (torch.float32, torch.bfloat16):
        c = default_chunk_size(8192, 128256, 4096, dtype)
        tile = 0 if dtype == torch.float32 else 4 * 4096 * tile_rows(128256, 4096, dtype)
        assert c >= 1 and 4 * c * (3 * 128256 + 2 * 4096) + tile <= 256 << 20
    assert default_chunk_size(10, 50) == 10


def test_gpu_default_chunk_is_tensor_core_sized_within_1_gib():
    """On a GPU: multiples of 128 rows, [chunk, V] buffers within ~1 GiB (768 rows for a dense
    teacher at V = 128256, fp32 logits of both and a bf16 gradient)."""
    from distill_ops.fused_linear import default_chunk_size

    c = default_chunk_size(8192, 128256, 4096, torch.bfloat16, 2.5, device="cuda")
    assert c == 768 and c * (4 * 128256 * 2.5 + 4 * 4096) <= 1 << 30
    assert default_chunk_size(8192, 262144, 4096, torch.bfloat16, 2.5, device="cuda") % 128 == 0
    assert default_chunk_size(100, 128256, 4096, torch.bfloat16, 2.5, device="cuda") == 100


def test_bf16_head_tiles_match_one_fp32_matmul(monkeypatch, seed):
    """A bf16 head upcast in vocabulary tiles (forced small here) gives the same logits and
    gradients as upcasting it whole."""
    import distill_ops.backends.head_matmul as fl

    hs, ws, bs = (x.to(torch.bfloat16) for x in head((9,), 16, 300))
    ht, wt, _ = (x.to(torch.bfloat16) for x in head((9,), 16, 300))
    out = []
    for budget in (fl._TILE_BUDGET, 16 * 4 * 7):  # whole head in one tile; tiles of 7 rows
        monkeypatch.setattr(fl, "_TILE_BUDGET", budget)
        a = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        loss = distill_ops.fused_linear_kd_loss(a[0], a[1], ht, wt, student_bias=a[2],
                                                chunk_size=4)
        loss.backward()
        out.append((loss, *[x.grad for x in a]))
    # The loss is fp32; the bf16 gradients are fp32 sums rounded once, and a different tile
    # order may move a sum across a rounding boundary: one bf16 ulp apart at most, which is
    # 2^-8 to 2^-7 of the value (seed 538306550: 2^-17 on 0.00132, 0.0058 of it).
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    for x, y in zip(out[0][1:], out[1][1:], strict=True):
        torch.testing.assert_close(x, y, rtol=2.0**-7, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({}, ValueError, "pass either teacher_hidden and teacher_weight"),
        ({"dense": True, "sparse": True}, ValueError, "not both"),
        ({"dense": True, "chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"dense": True, "student_weight": torch.zeros(50, 9)}, ValueError,
         r"student_weight must be \[V, H\]"),
        ({"dense": True, "student_bias": torch.zeros(49)}, ValueError, r"student_bias must be"),
        ({"dense": True, "teacher_weight": torch.zeros(60, 8)}, ValueError, "vocab_size"),
    ],
)
def test_bad_inputs(kw, exc, match):
    hs, ws, _ = head((4,), 8, 50, dtype=torch.float32)
    args = {"student_weight": ws}
    if kw.pop("dense", False):
        args.update(teacher_hidden=hs, teacher_weight=kw.pop("teacher_weight", ws))
    if kw.pop("sparse", False):
        args.update(teacher_indices=torch.zeros(4, 2, dtype=torch.long),
                    teacher_logprobs=torch.zeros(4, 2))
    args.update(kw)
    with pytest.raises(exc, match=match):
        distill_ops.fused_linear_kd_loss(hs, **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab_chunk", [64, 100, 1000])
def test_fused_linear_topk_matches_topk_of_logits(seed, backend, vocab_chunk):
    dev = device_for(backend)
    h, w, b = head((2, 5), 16, 300, dtype=torch.float32, device=dev)
    top = distill_ops.fused_linear_topk(h, w, 20, bias=b, temperature=1.5,
                                        vocab_chunk=vocab_chunk, chunk_size=3, backend=backend)
    ref_idx, ref_lp = reference.topk_logprobs((h.double() @ w.double().T + b.double()), 20,
                                              temperature=1.5)
    assert torch.equal(top.indices.cpu(), ref_idx.cpu())
    torch.testing.assert_close(top.logprobs.double().cpu(), ref_lp.cpu(), rtol=1e-5, atol=1e-5)


def test_fused_linear_topk_ties_across_tiles_keep_the_lower_id():
    h = torch.ones(1, 4)
    w = torch.zeros(200, 4)
    w[[150, 20, 90]] = 1.0  # three equal logits in three different tiles
    top = distill_ops.fused_linear_topk(h, w, 3, vocab_chunk=50)
    assert top.indices[0].tolist() == [20, 90, 150]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "softcap": 6.0, "logit_scale": 0.5}])
def test_fused_linear_topk_bitwise_ties_keep_the_lower_id_on_every_device(seed, backend,
                                                                          dtype, kw):
    """The tie contract: bitwise-equal logits rank by id. Small-integer heads and hidden
    states make every logit exact in any summation order (on any matmul kernel, bf16 or
    tensor cores included), so duplicated head rows spread over tiles tie bitwise on every
    device; the result must equal a stable sort of the materialised logits."""
    dev = device_for(backend)
    n, h_dim, v = 5, 8, 300
    hid = torch.randint(-2, 3, (n, h_dim), device=dev).to(dtype)
    base = torch.randint(-1, 2, (40, h_dim), device=dev)
    w = base[torch.randint(0, 40, (v,), device=dev)].to(dtype)  # many duplicate rows
    top = distill_ops.fused_linear_topk(hid, w, 25, vocab_chunk=64, backend=backend, **kw)
    x = hid.double() @ w.double().T  # exact
    z = reference.transform_logits(x, kw.get("logit_scale", 1.0), kw.get("softcap"),
                                   kw.get("temperature", 1.0), torch.float32)
    order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :25]
    assert torch.equal(top.indices.long().cpu(), order.cpu())
    assert (top.logprobs[:, :-1] >= top.logprobs[:, 1:]).all()


def test_torch_backend_is_the_materialised_reference(seed):
    hs, ws, bs = head((6,), 8, 90, dtype=torch.float32)
    ht, wt, _ = head((6,), 8, 90, dtype=torch.float32)
    kw = dict(divergence="reverse_kl", temperature=1.5)
    a = distill_ops.fused_linear_kd_loss(hs, ws, ht, wt, student_bias=bs, backend="torch", **kw)
    b = distill_ops.fused_linear_kd_loss(hs, ws, ht, wt, student_bias=bs, backend="cpu", **kw)
    ref = reference.kd_loss(hs @ ws.T + bs, ht @ wt.T, **kw)
    assert torch.equal(a, ref)
    assert_close(b, ref.double(), 1e-5, "loss", LOSS_FLOOR)


def test_under_autocast_the_logits_stay_fp32_from_autocast_dtype_operands(seed):
    """torch.autocast("cpu", bf16): the LM-head ops take bf16 operands, as autocast gives a
    linear layer, but never round the logits to bf16 (the GPU's tensor-core path): the loss
    equals the fp32 maths of the bf16-rounded operands, and fp32 leaves get fp32 grads."""
    hs, ws = logits(6, 16).requires_grad_(), (logits(50, 16) * 0.25).requires_grad_()
    ht, wt = logits(6, 24), logits(50, 24) * 0.25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distill_ops.fused_linear_kd_loss(hs, ws, ht, wt, temperature=2.0)
        top = distill_ops.fused_linear_topk(ht, wt, 5)
    loss.backward()
    r = lambda x: x.detach().to(torch.bfloat16).double()
    want = reference.kd_loss(r(hs) @ r(ws).T, r(ht) @ r(wt).T, temperature=2.0)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    assert hs.grad.dtype == torch.float32 and ws.grad.dtype == torch.float32
    rounded = reference.kd_loss((r(hs) @ r(ws).T).to(torch.bfloat16).double(),
                                (r(ht) @ r(wt).T).to(torch.bfloat16).double(), temperature=2.0)
    assert abs(rounded.item() - want.item()) > 10 * abs(loss.item() - want.item())
    want_top = reference.topk_logprobs(r(ht) @ r(wt).T, 5)
    assert torch.equal(top.indices, want_top[0])
    torch.testing.assert_close(top.logprobs.double(), want_top[1], rtol=1e-5, atol=1e-5)
