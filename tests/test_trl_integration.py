"""distill_ops.integrations.trl against TRL 1.16's own trainers, on tiny config-built models
(no download): the same loss (1e-5) and the same gradient of every student parameter (1e-4,
relative, fp32) for beta in {0, 0.5, 1}, two temperatures, logit scales and softcaps set in
the configs, masked completion and tool tokens; a few training steps that log the entropy;
GKD's generalized_jsd_loss and the server-distillation divergences on the same inputs."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

VOCAB = 64


def tiny(hidden: int, seed: int, **config) -> LlamaForCausalLM:
    """A one-layer Llama whose LM head is scaled up: at initialisation the logits are nearly
    flat and the divergences ~1e-3, where fp32 rounding alone is ~1e-5 relative."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, **config))
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    return model


def tokenizer() -> PreTrainedTokenizerFast:
    from distill_ops.bench.trl_step import _tokenizer

    return _tokenizer(VOCAB)


def _trainers(tmp_path, beta, temperature, student, teacher, **args):
    from datasets import Dataset

    from distill_ops.integrations import trl as ours

    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]})
    config = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True,
        temperature=temperature, beta=beta, max_completion_length=6, **args)
    out = []
    for cls in (trl.DistillationTrainer, ours.DistillationTrainer):
        out.append(cls(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
                       args=config, train_dataset=ds, processing_class=tokenizer()))
    return out


def _inputs(seed: int, tool_mask: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB - 3, (3, 5), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0  # left padding
    completion = torch.randint(0, VOCAB - 3, (3, 7), generator=g)
    completion_mask = torch.ones_like(completion)
    completion_mask[0, 5:] = 0  # a short completion
    completion_mask[2, 3:] = 0
    inputs = {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
              "completion_mask": completion_mask}
    if tool_mask:
        tm = torch.ones_like(completion)
        tm[1, 2:4] = 0  # tool output tokens are not trained on
        inputs["tool_mask"] = tm
    return inputs


def _loss_and_grads(trainer, inputs, num_items):
    model = trainer.model
    model.zero_grad()
    loss, entropy_sum, n_valid = trainer._compute_loss(model, inputs, num_items)
    loss.backward()
    return loss.detach(), entropy_sum, n_valid, {n: p.grad.clone() for n, p in
                                                 model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scale+softcap"])
def test_distillation_trainer_loss_and_every_gradient_equal_trls(tmp_path, beta, temperature,
                                                                  scaled):
    cfg_s = dict(logit_scale=0.7, final_logit_softcapping=6.0) if scaled else {}
    cfg_t = dict(logits_scaling=2.0, final_logit_softcapping=9.0) if scaled else {}
    theirs, ours = _trainers(tmp_path, beta, temperature, tiny(32, 0, **cfg_s),
                             tiny(48, 1, **cfg_t))
    for num_items in (None, torch.tensor(17.0)):
        inputs = _inputs(3, tool_mask=scaled)
        lt, et, nt, gt = _loss_and_grads(theirs, inputs, num_items)
        lo, eo, no, go = _loss_and_grads(ours, inputs, num_items)
        assert abs(lo.item() - lt.item()) <= 1e-5 * abs(lt.item()), (lo, lt)
        assert int(no) == int(nt)
        assert abs(eo.item() - et.item()) <= 1e-5 * abs(et.item())
        assert go.keys() == gt.keys() and len(gt) > 0
        for name in gt:
            assert _rel(go[name], gt[name]) <= 1e-4, name


@pytest.mark.parametrize(("divergence", "options"), [
    ("skew_kl", {"skew": 0.2}), ("skew_reverse_kl", {}), ("ab", {"ab_alpha": 0.3}),
    ("akl", {"akl_head_mass": 0.6}), ("forward_kl", {"teacher_interpolation": 0.7})])
def test_distillation_trainer_takes_the_research_divergences(tmp_path, divergence, options):
    """divergence= swaps TRL's JSD for any of ours (finite loss and gradients, not JSD's
    value); a bad option is refused when the trainer is built."""
    from datasets import Dataset

    from distill_ops.integrations import trl as ours

    config = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True,
        temperature=1.5, max_completion_length=6)
    ds = Dataset.from_dict({"prompt": ["w1 w2 w3"]})
    trainer = ours.DistillationTrainer(model=tiny(32, 0), teacher_model=tiny(48, 1), args=config,
                                       train_dataset=ds, processing_class=tokenizer(),
                                       divergence=divergence, divergence_options=options)
    inputs = _inputs(5, tool_mask=False)
    loss, _, _, grads = _loss_and_grads(trainer, inputs, None)
    assert torch.isfinite(loss) and len(grads) > 0
    plain = ours.DistillationTrainer(model=copy.deepcopy(trainer.model),
                                     teacher_model=trainer.teacher_model, args=config,
                                     train_dataset=ds, processing_class=tokenizer())
    jsd, _, _, _ = _loss_and_grads(plain, inputs, None)
    assert abs(loss.item() - jsd.item()) > 1e-6  # the divergence did change
    with pytest.raises(ValueError, match="ab_alpha"):
        ours.DistillationTrainer(model=tiny(32, 0), teacher_model=tiny(48, 1), args=config,
                                 train_dataset=ds, processing_class=tokenizer(),
                                 divergence="ab", divergence_options={"ab_alpha": 0.0})
    with pytest.raises(ValueError, match="divergence_options"):
        ours.DistillationTrainer(model=tiny(32, 0), teacher_model=tiny(48, 1), args=config,
                                 train_dataset=ds, processing_class=tokenizer(),
                                 divergence="ab", divergence_options={"alpha": 0.3})


def test_distillation_trainer_trains_and_logs_entropy(tmp_path):
    _, ours = _trainers(tmp_path, 0.5, 1.0, tiny(32, 0), tiny(48, 1), max_steps=3,
                        logging_steps=1, learning_rate=1e-2)
    ours.train()
    logged = [h for h in ours.state.log_history if "entropy" in h]
    assert len(logged) >= 3
    assert all(h["entropy"] > 0 for h in logged)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged if "loss" in h)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gkd_generalized_jsd_loss_equals_trls(seed, beta, temperature):
    from trl.experimental.gkd import GKDTrainer as TRLGKD

    from distill_ops.integrations.trl import GKDTrainer

    s = torch.randn(3, 6, VOCAB) * 2
    t = torch.randn(3, 6, VOCAB) * 2
    labels = torch.randint(0, VOCAB, (3, 6))
    labels[:, :2] = -100
    for kw in (dict(labels=labels), dict(labels=labels, num_items_in_batch=torch.tensor(11.0)),
               dict(), dict(reduction="sum", labels=labels), dict(reduction="mean"),
               dict(reduction="mean", labels=labels)):
        a = s.clone().requires_grad_()
        b = s.clone().requires_grad_()
        theirs = TRLGKD.generalized_jsd_loss(a, t, beta=beta, temperature=temperature, **kw)
        ours = GKDTrainer.generalized_jsd_loss(b, t, beta=beta, temperature=temperature, **kw)
        theirs.backward()
        ours.backward()
        assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item()) + 1e-7, kw
        assert _rel(b.grad, a.grad) <= 1e-4, kw


def test_gkd_trainer_compute_loss_equals_trls(tmp_path):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig
    from trl.experimental.gkd import GKDTrainer as TRLGKD

    from distill_ops.integrations.trl import GKDTrainer

    ds = Dataset.from_dict({"messages": [[{"role": "user", "content": "w1 w2"},
                                          {"role": "assistant", "content": "w3"}]]})
    student, teacher = tiny(32, 0), tiny(48, 1)
    ids = torch.randint(0, VOCAB - 3, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    losses, grads = [], []
    for cls in (TRLGKD, GKDTrainer):
        config = GKDConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.3,
                           max_length=16)
        tok = tokenizer()
        tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}")
        trainer = cls(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
                      args=config, train_dataset=ds, processing_class=tok)
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0])
    for name in grads[0]:
        assert _rel(grads[1][name], grads[0][name]) <= 1e-4, name


def _server(cls, beta, add_tail):
    obj = cls.__new__(cls)
    obj.beta, obj.loss_add_tail, obj.reverse_kl_top_1_mode = beta, add_tail, "sampled"
    return obj


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_server_distillation_divergences_equal_trls(seed, beta, add_tail):
    from trl.experimental.server_distillation import ServerDistillationTrainer as TRLServer

    from distill_ops.integrations.trl import ServerDistillationTrainer

    b, t, k = 2, 5, 4
    logits = torch.randn(b, t, VOCAB) * 2
    teacher = torch.log_softmax(torch.randn(b, t, VOCAB) * 2, -1)
    top = teacher.topk(k, dim=-1)
    labels = torch.randint(0, VOCAB, (b, t))
    labels[0, -1] = -100
    tokens = torch.randint(0, VOCAB, (b, t))
    tokens[1, 2] = top.indices[1, 2, 0]  # a reverse-KL token that is the teacher's top-1
    result = {"topk_logprobs": top.values.clone(), "topk_token_ids": top.indices.clone(),
              "actual_logprobs": teacher.gather(-1, tokens[..., None])[..., 0]}
    result["topk_logprobs"][1, 0, 3] = float("-inf")  # a slot the server did not fill
    out = []
    for cls in (TRLServer, ServerDistillationTrainer):
        x = logits.clone().requires_grad_()
        lp = torch.log_softmax(x, -1)
        trainer = _server(cls, beta, add_tail)
        if beta == 0.0:
            loss = trainer._compute_server_forward_kl_loss(result, lp, labels)
        else:
            loss = trainer._compute_server_sparse_top_1_divergence_loss(
                {**result, "topk_logprobs": result["topk_logprobs"][..., :1],
                 "topk_token_ids": result["topk_token_ids"][..., :1]}, lp, tokens, labels)
        loss.backward()
        out.append((loss.detach(), x.grad))
    (lt, gt), (lo, go) = out
    assert abs(lo.item() - lt.item()) <= 1e-5 * abs(lt.item()), (lo, lt)
    assert _rel(go, gt) <= 1e-4


def test_a_trl_outside_the_tested_range_is_refused(monkeypatch):
    import importlib

    import distill_ops.integrations.trl as mod

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match=r"TRL 1\.16\.x \(>=1\.16,<1\.17\).*1\.17\.0"):
        importlib.reload(mod)
    monkeypatch.undo()
    importlib.reload(mod)


def test_importing_distill_ops_does_not_import_trl():
    code = "import sys, distill_ops; print('trl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_harness_times_one_step_of_each_trainer_on_the_same_batch():
    from distill_ops.bench.trl_step import format_trl_table, run_trl_step

    rows = run_trl_step(16, 24, 300, batch=2, prompt=4, completion=8, reps=1)
    assert [r["impl"] for r in rows] == ["trl", "distill_ops"]
    assert abs(rows[0]["loss"] - rows[1]["loss"]) <= 1e-5 * abs(rows[0]["loss"])
    assert all(r["step_ms"] > 0 and r["completion_tokens"] == 16 for r in rows)
    assert "| distill_ops |" in format_trl_table(rows)


def _trl_trainer(tmp_dir: str):
    from datasets import Dataset

    from distill_ops.integrations import trl as ours

    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]})
    config = trl.DistillationConfig(
        output_dir=tmp_dir, per_device_train_batch_size=3, report_to=[], use_cpu=True,
        temperature=2.0, beta=0.5, max_completion_length=6)
    return ours.DistillationTrainer(model=tiny(32, 0), teacher_model=tiny(48, 1), args=config,
                                    train_dataset=ds, processing_class=tokenizer())


def _rows(inputs: dict, part: slice) -> dict:
    return {k: v[part] for k, v in inputs.items()}


def _six_rows() -> dict:
    a, b = _inputs(3, tool_mask=True), _inputs(4, tool_mask=True)
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _rank_env(rank: int, world: int) -> None:
    """The launcher's environment, which accelerate reads for its process count."""
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))


def _wrapped(trainer, wrap: str, world: int):
    """The trainer's student under DDP (accelerate's prepare_model, as the Trainer does) or
    fully_shard per layer and root (then the student itself)."""
    assert trainer.accelerator.num_processes == world
    student = trainer.model
    if wrap == "ddp":
        model = trainer.accelerator.prepare_model(student)
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    return student


def _check_ranks_equal_one_process(want, model, ranks) -> None:
    """Each rank's (mean loss, full gradients) against one process's loss `want` (backward
    run here) and `model`'s gradients."""
    want.backward()
    for loss, grads in ranks:
        assert abs(loss - want.item()) <= 1e-5 * abs(want.item()), (loss, want)
        for name, p in model.named_parameters():
            torch.testing.assert_close(torch.tensor(grads[name]), p.grad, rtol=1e-4,
                                       atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def _trl_ddp_case(rank, world, wrap, tmp_dir):
    """TRL's DistillationTrainer.compute_loss (which routes our _compute_loss through TRL's
    forward redirection) with the student under DDP (accelerate's prepare_model, as the
    Trainer does) or fully_shard, each rank on its half of the rows, TRL's convention for
    the token count: num_items_in_batch = all ranks' tokens / the process count."""
    _rank_env(rank, world)
    trainer = _trl_trainer(f"{tmp_dir}/{rank}")
    student = trainer.model
    model = _wrapped(trainer, wrap, world)
    inputs = _six_rows()
    n_tokens = (inputs["completion_mask"] * inputs["tool_mask"]).sum().float()
    part = slice(rank * 3, rank * 3 + 3)
    from dist_helpers import mean_loss_and_full_grads

    loss = trainer.compute_loss(model, _rows(inputs, part),
                                num_items_in_batch=n_tokens / world)
    return mean_loss_and_full_grads(loss, student)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_distillation_trainer_under_ddp_and_fsdp2_equals_one_process(tmp_path, wrap):
    """Our TRL DistillationTrainer with the student wrapped (DDP through accelerate, or
    fully_shard per layer and root) on 2 gloo ranks, three rows each: the mean loss and every
    student gradient equal one process's over all six rows (rows of different token counts:
    the count is global, as TRL passes it)."""
    from dist_helpers import run_ranks

    trainer = _trl_trainer(str(tmp_path / "one"))
    inputs = _six_rows()
    n_tokens = (inputs["completion_mask"] * inputs["tool_mask"]).sum().float()
    want = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=n_tokens)
    _check_ranks_equal_one_process(want, trainer.model,
                                   run_ranks(_trl_ddp_case, 2, wrap, str(tmp_path), timeout=300))


def _gkd_trainer(tmp_dir: str, student, teacher):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    from distill_ops.integrations.trl import GKDTrainer

    ds = Dataset.from_dict({"messages": [[{"role": "user", "content": "w1 w2"},
                                          {"role": "assistant", "content": "w3"}]]})
    # fp32: GKDConfig's default bf16=True makes accelerate's prepare_model autocast the
    # student's forward (3e-4 of the loss here), which the unwrapped one-process model and
    # the fully_shard ranks would not.
    config = GKDConfig(output_dir=tmp_dir, report_to=[], use_cpu=True, beta=0.3, max_length=16,
                       temperature=1.5, bf16=False)
    tok = tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=ds,
                      processing_class=tok)


def _gkd_inputs() -> dict:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB - 3, (4, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the same number of counted tokens in every row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _gkd_ddp_case(rank, world, wrap, tmp_dir):
    """GKDTrainer.compute_loss with the student under DDP (accelerate's prepare_model) or
    fully_shard, each rank on its half of the rows."""
    _rank_env(rank, world)
    trainer = _gkd_trainer(f"{tmp_dir}/{rank}", tiny(32, 0), tiny(48, 1))
    student = trainer.model
    model = _wrapped(trainer, wrap, world)
    from dist_helpers import mean_loss_and_full_grads

    loss = trainer.compute_loss(model, _rows(_gkd_inputs(), slice(rank * 2, rank * 2 + 2)))
    return mean_loss_and_full_grads(loss, student)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_gkd_trainer_under_ddp_and_fsdp2_equals_one_process(tmp_path, wrap):
    """Our GKDTrainer (its generalized_jsd_loss is kd_loss) with the student wrapped (DDP
    through accelerate, or fully_shard per layer and root) on 2 gloo ranks, two rows each:
    TRL's GKD averages over each rank's own tokens and the wrapper averages the gradients,
    so with the same token count on every rank the mean loss and every student gradient
    equal one process's over all four rows."""
    from dist_helpers import run_ranks

    trainer = _gkd_trainer(str(tmp_path / "one"), tiny(32, 0), tiny(48, 1))
    want = trainer.compute_loss(trainer.model, _gkd_inputs())
    _check_ranks_equal_one_process(want, trainer.model,
                                   run_ranks(_gkd_ddp_case, 2, wrap, str(tmp_path), timeout=300))
