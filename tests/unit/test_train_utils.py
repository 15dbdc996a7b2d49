"""Training pieces that run without Ray: LR schedule, optimizer, model, checkpoints, eval."""

from __future__ import annotations

import io
import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

from lmforge.config import ModelConfig, TrainConfig
from lmforge.data import ValidationSet
from lmforge.model import build_model, count_parameters, flops_per_token
from lmforge.train.checkpoint import (
    IncompleteCheckpoint,
    UnsafeCheckpoint,
    _SafePlanner,
    export_hf,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.train.loop import TrainerState
from lmforge.train.parallel import Parallel
from lmforge.train.step import evaluate, lr_at, make_optimizer

# --- learning-rate schedule ----------------------------------------------------------


def schedule(cfg: TrainConfig) -> list[float]:
    """The LR of every step the training loop runs (steps 0 .. steps-1)."""
    return [lr_at(step, cfg) for step in range(cfg.steps)]


def test_warmup_rises_linearly_to_lr():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    lrs = schedule(cfg)[:10]
    assert lrs[0] > 0
    assert lrs[-1] == pytest.approx(cfg.lr)
    steps = np.diff(lrs)
    assert np.allclose(steps, cfg.lr / 10)


@pytest.mark.parametrize("min_lr", [None, 1e-5])
def test_cosine_decays_monotonically_after_warmup(min_lr):
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=min_lr)
    after = schedule(cfg)[10:]
    assert after[0] == pytest.approx(cfg.lr)
    assert all(b < a for a, b in zip(after, after[1:], strict=False))
    assert min(after) >= cfg.final_lr


@pytest.mark.parametrize(("steps", "warmup", "min_lr"), [(10, 2, None), (20, 0, 2e-4)])
def test_last_step_uses_final_lr(steps, warmup, min_lr):
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, lr=1e-3, min_lr=min_lr)
    expected = 1e-4 if min_lr is None else min_lr  # lr / 10 by default
    assert cfg.final_lr == pytest.approx(expected)
    # The loop runs steps 0 .. steps-1, so the decay must end on step steps-1.
    assert schedule(cfg)[-1] == pytest.approx(expected)


def test_no_warmup_starts_at_peak():
    cfg = TrainConfig(steps=50, warmup_steps=0, lr=3e-3)
    assert lr_at(0, cfg) == pytest.approx(3e-3)


# --- optimizer and model -------------------------------------------------------------

TINY = ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16)
VOCAB, EOS_ID = 50, 0


def tiny(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return build_model(TINY, VOCAB, EOS_ID)


def test_build_model_follows_the_spec():
    model = build_model(ModelConfig(n_layer=3, n_embd=48, n_head=6, block_size=32,
                                    dropout=0.1), vocab_size=77, eos_id=5)
    c = model.config
    assert isinstance(model, GPT2LMHeadModel)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_positions) == (3, 48, 6, 32)
    assert c.vocab_size == 77
    assert c.eos_token_id == c.bos_token_id == c.pad_token_id == 5
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.1
    assert len(model.transformer.h) == 3
    assert model.transformer.wpe.weight.shape == (32, 48)
    logits = model(input_ids=torch.zeros(2, 32, dtype=torch.long)).logits
    assert logits.shape == (2, 32, 77)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_weight_decay_only_on_matrices():
    model = tiny()
    cfg = TrainConfig(weight_decay=0.05, lr=2e-3, betas=(0.8, 0.95))
    opt = make_optimizer(model, cfg)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert decayed["params"] and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["params"] and all(p.dim() < 2 for p in plain["params"])
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(in_groups)  # no duplicates
    assert all(g["lr"] == 2e-3 and g["betas"] == (0.8, 0.95) for g in opt.param_groups)


def test_frozen_parameters_are_not_optimized():
    model = tiny()
    model.transformer.wpe.weight.requires_grad_(False)
    opt = make_optimizer(model, TrainConfig())
    assert all(p is not model.transformer.wpe.weight
               for g in opt.param_groups for p in g["params"])


def loss_on(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss of the loop: cross entropy of logits against next tokens."""
    return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())


def fixed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, VOCAB, (4, TINY.block_size + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def train_steps(model, opt, n: int, seed: int = 0) -> list[float]:
    model.train()
    x, y = fixed_batch(seed)
    losses = []
    for _ in range(n):
        loss = loss_on(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_optimizer_steps_lower_the_loss():
    model = tiny()
    losses = train_steps(model, make_optimizer(model, TrainConfig(lr=1e-2)), 15)
    assert losses[-1] < 0.8 * losses[0]


def test_evaluate_is_mean_token_loss_over_the_fixed_set(write_entry):
    tokens = np.random.default_rng(0).integers(0, VOCAB, 16 * 10 + 1).astype(np.uint16)
    data = write_entry(train=[tokens], validation=[tokens])
    val = ValidationSet(data, TINY.block_size, 0, 1, batch_size=3, max_batches=2)
    model = tiny().train()
    got = evaluate(model, val, torch.device("cpu"))
    with torch.no_grad():
        model.eval()
        xs, ys = zip(*val, strict=True)
        expected = loss_on(model, torch.cat(xs), torch.cat(ys)).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert got == evaluate(model, val, torch.device("cpu"))
    assert model.training  # evaluate puts the model back into training mode


# --- checkpoints ---------------------------------------------------------------------

CPU = torch.device("cpu")


def ddp(**overrides) -> Parallel:
    """The DDP strategy as one process sees it (no process group: no wrapper)."""
    return Parallel(TrainConfig(**overrides), CPU)


def save(directory, model, opt, par: Parallel, tokenizer_dir: str, step: int) -> None:
    state = TrainerState(step=step, best_val_loss=1.5)
    save_checkpoint(directory, model, par, opt, 0, tokenizer_dir,
                    {**state.__dict__, "metrics": {"val_loss": 1.5}})


@pytest.fixture
def trained(tmp_path, tokenizer_dir):
    """A model and optimizer after 3 steps, checkpointed at step 3."""
    model = tiny(seed=0)
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    train_steps(model, opt, 3)
    ckpt = tmp_path / "ckpt"
    save(ckpt, model, opt, ddp(), tokenizer_dir, step=3)
    return model, opt, ckpt


def test_checkpoint_is_hugging_face_format(trained):
    model, _, ckpt = trained
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "trainer_state.json",
            "optimizer.pt", "rng_rank0.pt"} <= names
    assert "pytorch_model.bin" not in names
    reloaded = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    x, _ = fixed_batch(1)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.decode(tok.encode("the fox", add_special_tokens=False)) == "the fox"


def test_load_checkpoint_restores_weights_optimizer_and_step(trained):
    model, opt, ckpt = trained
    fresh = tiny(seed=1)
    fresh_opt = make_optimizer(fresh, TrainConfig(lr=1e-2))
    assert not torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)

    state = load_checkpoint(ckpt, fresh, ddp(), fresh_opt, rank=0)
    assert state["step"] == 3 and state["attempt"] == 1 and state["best_val_loss"] == 1.5

    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()
    saved, restored = opt.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    assert saved["state"].keys() == restored["state"].keys()
    for key, state in saved["state"].items():
        for name, value in state.items():
            other = restored["state"][key][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (key, name)


def test_resume_continues_exactly_like_an_uninterrupted_run(trained):
    model, opt, ckpt = trained
    uninterrupted = train_steps(model, opt, 3)

    resumed = tiny(seed=1)
    resumed_opt = make_optimizer(resumed, TrainConfig(lr=1e-2))
    load_checkpoint(ckpt, resumed, ddp(), resumed_opt, rank=0)
    assert train_steps(resumed, resumed_opt, 3) == uninterrupted
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_checkpoint_restores_this_ranks_rng(tmp_path, tokenizer_dir):
    model = tiny()
    opt = make_optimizer(model, TrainConfig())
    torch.manual_seed(123)
    save(tmp_path / "c", model, opt, ddp(), tokenizer_dir, step=1)
    expected = torch.rand(5)
    other = tiny(seed=9)  # reseeds the RNG
    load_checkpoint(tmp_path / "c", other, ddp(), make_optimizer(other, TrainConfig()), rank=0)
    assert torch.equal(torch.rand(5), expected)


def test_half_written_checkpoint_is_refused(trained, tmp_path):
    """A checkpoint is complete or absent: without its final marker it never loads."""
    _, _, ckpt = trained
    (ckpt / "trainer_state.json").unlink()  # what a crash before the last write leaves
    model = tiny(seed=1)
    with pytest.raises(IncompleteCheckpoint, match="never finished"):
        load_checkpoint(ckpt, model, ddp(), make_optimizer(model, TrainConfig()), rank=0)


def test_export_of_a_ddp_checkpoint_is_a_loadable_hf_directory(trained, tmp_path):
    model, _, ckpt = trained
    out = export_hf(ckpt, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not names & {"optimizer.pt", "rng_rank0.pt", "trainer_state.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # no temp left
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x, _ = fixed_batch(1)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, model.eval()(input_ids=x).logits)


def test_fsdp_checkpoint_round_trip_and_export(process_group, tmp_path, tokenizer_dir):
    """FSDP2 writes sharded torch.distributed.checkpoint files; they resume the same model
    and optimizer, and export to one Hugging Face directory that serves the same logits."""
    par = Parallel(TrainConfig(strategy="fsdp", lr=1e-2), CPU)
    model = par.wrap(tiny(seed=0))
    opt = make_optimizer(model, par.cfg)
    train_steps(model, opt, 3)
    save(tmp_path / "ckpt", model, opt, par, tokenizer_dir, step=3)
    assert (tmp_path / "ckpt" / "dcp" / ".metadata").exists()
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    uninterrupted = train_steps(model, opt, 3)

    resumed = par.wrap(tiny(seed=1))
    resumed_opt = make_optimizer(resumed, par.cfg)
    assert load_checkpoint(tmp_path / "ckpt", resumed, par, resumed_opt, rank=0)["step"] == 3
    assert train_steps(resumed, resumed_opt, 3) == pytest.approx(uninterrupted, abs=1e-6)

    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = tiny(seed=0)
    ref_opt = make_optimizer(reference, TrainConfig(lr=1e-2))
    train_steps(reference, ref_opt, 3)  # the same 3 steps, unsharded
    x, _ = fixed_batch(1)
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=x).logits,
                              reference.eval()(input_ids=x).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(
        tokenizer_dir).vocab_size


class Planted:
    """Unpickling this runs code: what a tampered checkpoint would carry."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_fsdp_checkpoint_with_planted_code_is_refused(process_group, tmp_path, tokenizer_dir):
    """torch's own DCP reader would unpickle .metadata and bytes entries freely."""
    par = Parallel(TrainConfig(strategy="fsdp"), CPU)
    model = par.wrap(tiny(seed=0))
    opt = make_optimizer(model, par.cfg)
    train_steps(model, opt, 1)
    save(tmp_path / "ckpt", model, opt, par, tokenizer_dir, step=1)
    metadata = tmp_path / "ckpt" / "dcp" / ".metadata"
    metadata.write_bytes(pickle.dumps(Planted()))
    # Under a process group DCP wraps each rank's error in a CheckpointException.
    refused = (UnsafeCheckpoint, CheckpointException)
    with pytest.raises(refused, match=r"(posix|os)\.system.*refusing to load"):
        load_checkpoint(tmp_path / "ckpt", model, par, opt, rank=0)
    with pytest.raises(refused, match="refusing to load"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")



def test_non_tensor_checkpoint_entries_load_weights_only():
    """The optimizer's hyperparameters are stored as pickled bytes entries; ours load them
    with weights_only=True, so plain values pass and a planted object does not."""
    planner = _SafePlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups.0.lr"))
    for value in (1e-3, (0.9, 0.99), {"fused": True, "foreach": None}):
        torch.save(value, buf := io.BytesIO())
        buf.seek(0)
        planner.load_bytes(item, buf)
        assert planner.state_dict["optim.param_groups.0.lr"] == value
    torch.save(Planted(), buf := io.BytesIO())
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        planner.load_bytes(item, buf)


# --- strategy pieces ------------------------------------------------------------------


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-steps of half the batch, loss / 2 each, give the big batch's gradient."""
    x, y = fixed_batch(3)
    big, acc = tiny(seed=0), tiny(seed=0)
    loss_on(big, x, y).backward()
    par = ddp(grad_accum=2)
    for i, half in enumerate((slice(0, 2), slice(2, 4))):
        with par.micro_step(acc, last=i == 1):
            loss = loss_on(acc, x[half], y[half]) / 2
        par.backward(loss)
    for (name, a), b in zip(big.named_parameters(), acc.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_clip_and_step_clips_reports_the_norm_and_zeroes_grads():
    model = tiny()
    par = ddp(grad_clip=0.01)
    opt = make_optimizer(model, par.cfg)
    loss_on(model, *fixed_batch()).backward()
    norm = par.clip_and_step(model, opt)
    assert float(norm) > 0.01  # the norm before clipping
    assert all(p.grad is None for p in model.parameters())


def test_bf16_autocast_on_cpu_runs_the_forward_in_bf16():
    model = tiny()
    par = ddp(precision="bf16")
    with par.micro_step(model, last=True):
        logits = model(input_ids=fixed_batch()[0]).logits
    assert logits.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_fp16_uses_a_grad_scaler():
    assert ddp(precision="fp16").scaler.is_enabled()
    assert not ddp(precision="bf16").scaler.is_enabled()


def test_fused_adamw_is_used_where_the_device_has_it():
    assert make_optimizer(tiny(), TrainConfig(), CPU).defaults["fused"]
    assert not make_optimizer(tiny(), TrainConfig(fused_optimizer=False), CPU).defaults["fused"]


def test_llama_from_config():
    model = build_model(ModelConfig(arch="llama", n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                    block_size=32), vocab_size=50, eos_id=0)
    assert isinstance(model, LlamaForCausalLM)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads) == (2, 64, 2)
    assert c.intermediate_size % 64 == 0 and c.max_position_embeddings == 32
    assert model(input_ids=torch.zeros(1, 32, dtype=torch.long)).logits.shape == (1, 32, 50)


def test_pretrained_model_loads_from_a_local_directory(tmp_path):
    tiny(seed=4).save_pretrained(tmp_path / "base")
    model = build_model(ModelConfig(pretrained=str(tmp_path / "base")), VOCAB, EOS_ID)
    assert torch.equal(model.transformer.wte.weight, tiny(seed=4).transformer.wte.weight)
    with pytest.raises(ValueError, match="model.pretrained.*50 token embeddings"):
        build_model(ModelConfig(pretrained=str(tmp_path / "base")), VOCAB + 1, EOS_ID)


def test_flops_per_token_is_six_n_plus_attention():
    model = tiny()
    n = count_parameters(model) - model.transformer.wpe.weight.numel()
    assert flops_per_token(model, 16) == 6 * n + 12 * 2 * 32 * 16


def test_early_stopping_counts_evaluations_without_a_new_best():
    state = TrainerState()
    losses = [3.0, 2.5, 2.6, 2.55, 2.7]
    stops = [state.record_eval(v, patience=3, min_delta=0.0) for v in losses]
    assert stops == [False, False, False, False, True]
    assert state.best_val_loss == 2.5 and state.evals_since_best == 3


def test_early_stopping_min_delta_ignores_tiny_improvements():
    state = TrainerState()
    stops = [state.record_eval(v, patience=2, min_delta=0.1) for v in [3.0, 2.95, 2.91]]
    assert stops == [False, False, True]
    assert state.best_val_loss == 2.91  # the best is still tracked, only the count ignores it


def test_no_patience_never_stops():
    state = TrainerState()
    assert not any(state.record_eval(3.0, patience=None, min_delta=0.0) for _ in range(20))


def test_lmforge_export_command(trained, tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    _, _, ckpt = trained
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(ckpt), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "model.safetensors").exists()
    (ckpt / "trainer_state.json").unlink()  # as a crash mid-write leaves it
    half = runner.invoke(app, ["export", str(ckpt), str(tmp_path / "hf2")])
    assert half.exit_code == 1 and "never finished" in half.output
    assert not (tmp_path / "hf2").exists()
    missing = runner.invoke(app, ["export", str(tmp_path / "nope"), str(tmp_path / "hf3")])
    assert missing.exit_code == 1 and "not a training checkpoint" in missing.output


def test_compiled_train_step_matches_eager():
    """train.compile: forward and loss in one compiled graph, the same numbers as eager."""
    from lmforge.train.step import train_step

    losses = {}
    for compiled in (False, True):
        par = ddp(compile=compiled, lr=1e-2)
        model = par.wrap(tiny(seed=0))
        opt = make_optimizer(model, par.cfg)
        losses[compiled] = [float(train_step(model, par, opt, [fixed_batch(i)], 1e-2)[0])
                            for i in range(3)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
