"""The fused LM-head ops under data parallelism on gloo CPU ranks: a student wrapped with
DDP, and with FSDP2 (`fully_shard`, whose parameters are sharded DTensors outside the
module's forward, where the op reads the head). Each rank takes half of a batch; the loss
and every gradient equal one process's on the whole batch. DTensors the op cannot use are a
ValueError naming the argument."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_helpers import mean_loss_and_full_grads, run_ranks

import distill_ops

N, H, V = 12, 16, 97


class Student(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))  # the hidden states; the head is read by the op


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    h_t = torch.randn(N, 24, generator=g)
    w_t = torch.randn(V, 24, generator=g) * 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    return x, h_t, w_t, labels


def _loss(model, x, h_t, w_t, labels, **kw):
    head = model.head
    return distill_ops.fused_linear_kd_loss(model(x), head.weight, h_t, w_t,
                                            student_bias=head.bias, labels=labels,
                                            hard_weight=0.3, temperature=1.5, **kw)


def _single(seed: int, **kw):
    torch.manual_seed(seed)
    model = Student()
    x, h_t, w_t, labels = _batch(seed)
    loss = _loss(model, x, h_t, w_t, labels, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _half(rank: int, world: int, seed: int):
    x, h_t, w_t, labels = _batch(seed)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    return x[rows], h_t[rows], w_t, labels[rows]


def _ddp_case(rank, world, seed, kw):
    torch.manual_seed(seed)
    model = torch.nn.parallel.DistributedDataParallel(Student())
    x, h_t, w_t, labels = _half(rank, world, seed)
    head = model.module.head
    loss = distill_ops.fused_linear_kd_loss(model(x), head.weight, h_t, w_t,
                                            student_bias=head.bias, labels=labels,
                                            hard_weight=0.3, temperature=1.5, **kw)
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    # Plain lists cross the process boundary (tensors would need shared memory).
    return (total / world).item(), {n.removeprefix("module."): p.grad.tolist()
                                    for n, p in model.named_parameters()}


def _fsdp_case(rank, world, seed, kw):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Student()
    fully_shard(model.head)
    fully_shard(model)
    x, h_t, w_t, labels = _half(rank, world, seed)
    loss = _loss(model, x, h_t, w_t, labels, **kw)
    kinds = type(model.head.weight).__name__
    loss.backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return (total / world).item(), kinds, {n: p.grad.full_tensor().tolist()
                                           for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"divergence": "jsd", "beta": 0.3},
                                {"divergence": "ab", "teacher_interpolation": 0.8}], ids=str)
def test_ddp_equals_one_process(seed, kw):
    want_loss, want = _single(seed, **kw)
    for loss, grads in run_ranks(_ddp_case, 2, seed, kw):
        assert abs(loss - want_loss.item()) <= 1e-5 * abs(want_loss.item()) + 1e-6
        assert grads.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(torch.tensor(grads[name]), want[name], rtol=1e-4,
                                       atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"divergence": "skew_kl"}], ids=str)
def test_fsdp2_equals_one_process(seed, kw):
    """FSDP2 on CPU ranks (torch >= 2.6 runs fully_shard over gloo): the head reaches the op
    as a sharded DTensor, which it gathers; each rank's gradient shards are the single
    process's."""
    want_loss, want = _single(seed, **kw)
    for loss, kind, grads in run_ranks(_fsdp_case, 2, seed, kw):
        assert kind == "DTensor"
        assert abs(loss - want_loss.item()) <= 1e-5 * abs(want_loss.item()) + 1e-6
        for name in want:
            torch.testing.assert_close(torch.tensor(grads[name]), want[name], rtol=1e-4,
                                       atol=1e-6)


def _dtensor_errors(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    h = torch.randn(4, H)
    w = torch.randn(V, H)
    out = []
    for call in (
        lambda: distill_ops.fused_linear_kd_loss(distribute_tensor(h, mesh, [Shard(0)]), w, h,
                                                 w),
        lambda: distill_ops.fused_linear_topk(distribute_tensor(h, mesh, [Shard(0)]), w, 3),
        lambda: distill_ops.fused_linear_kd_loss(h, distribute_tensor(w, mesh, [Shard(0)]), h,
                                                 w[: V // 2 + rank],
                                                 process_group=torch.distributed.group.WORLD),
    ):
        try:
            call()
            out.append("no error")
        except ValueError as exc:
            out.append(str(exc))
    top = distill_ops.fused_linear_topk(h, distribute_tensor(w, mesh, [Shard(0)]), 3)
    ref = distill_ops.fused_linear_topk(h, w, 3)
    out.append(bool(torch.equal(top.indices, ref.indices)))
    return out


def test_dtensors_the_op_cannot_use_are_named():
    for msgs in run_ranks(_dtensor_errors, 2):
        assert "student_hidden is a DTensor" in msgs[0] and "to_local()" in msgs[0]
        assert "hidden is a DTensor" in msgs[1]
        assert "process_group= takes each rank's plain slice" in msgs[2]
        assert msgs[3] is True  # a sharded head gathered for top-k gives the same top-k


def test_single_process_model_is_unchanged(seed):
    """The wrapper-free path is what the ranks are compared with: deterministic."""
    a, ga = _single(seed)
    b, gb = _single(seed)
    assert torch.equal(a, b) and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert copy.deepcopy(ga).keys() == {"body.weight", "body.bias", "head.weight", "head.bias"}


def _example(rank, world, how):
    from helpers import load_example

    return load_example("fsdp2_distill").main(["--wrap", how, "--divergence", "skew_kl"])


def test_example_fsdp2_and_ddp_step_like_one_process():
    """examples/fsdp2_distill.py on 2 ranks: FSDP2 and DDP take the same steps as one
    process over both ranks' sequences would (DDP's and FSDP's losses agree step for step),
    and the loss goes down."""
    fsdp = run_ranks(_example, 2, "fsdp2", timeout=240)
    ddp = run_ranks(_example, 2, "ddp", timeout=240)
    a, b = fsdp[0]["losses"], ddp[0]["losses"]
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b, strict=True)), (a, b)
    assert a[-1] < a[0], a


def _hf_models_and_batch(seed: int):
    from helpers import load_example

    ex = load_example("hf_trainer")
    student, teacher = ex.tiny_causal_lm(32, seed=seed), ex.tiny_causal_lm(48, seed=seed + 1)
    rows = ex.random_batches(8, 12, 128, seed=seed)
    return student, teacher.eval(), rows


def _hf_loss(model, teacher, rows):
    """DistillTrainer.compute_loss on `rows`, as the Trainer calls it (with the model it
    trains: the DDP wrapper, the fully_shard module), without a Trainer around it."""
    from distill_ops.integrations.hf import DistillTrainer

    trainer = DistillTrainer.__new__(DistillTrainer)  # compute_loss reads only these
    trainer.teacher, trainer.distill = teacher, {"divergence": "jsd", "temperature": 2.0,
                                                 "hard_weight": 0.2}
    inputs = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return trainer.compute_loss(model, inputs)


def _hf_case(rank, world, seed, wrap):
    from torch.distributed.fsdp import fully_shard

    student, teacher, rows = _hf_models_and_batch(seed)
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(student)
    else:
        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
        model = student
    part = len(rows) // world
    loss = _hf_loss(model, teacher, rows[rank * part:(rank + 1) * part])
    return mean_loss_and_full_grads(loss, student)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_hf_distill_trainer_loss_under_ddp_and_fsdp2_equals_one_process(seed, wrap):
    """integrations.hf.DistillTrainer.compute_loss with the student wrapped by DDP or
    fully_shard (per layer and the root), each rank on half the rows (the same number of
    counted labels): the mean loss and every gradient equal one process's on all rows."""
    student, teacher, rows = _hf_models_and_batch(seed)
    want_loss = _hf_loss(student, teacher, rows)
    want_loss.backward()
    for loss, grads in run_ranks(_hf_case, 2, seed, wrap, timeout=240):
        assert abs(loss - want_loss.item()) <= 1e-5 * abs(want_loss.item()) + 1e-6
        for name, p in student.named_parameters():
            torch.testing.assert_close(torch.tensor(grads[name]), p.grad, rtol=1e-4,
                                       atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
