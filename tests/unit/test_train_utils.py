"""Training pieces that run without Ray: LR schedule, optimizer, model, checkpoints, eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2LMHeadModel

from lmforge.config import ModelConfig, TrainConfig
from lmforge.data import ValidationSet
from lmforge.model import build_model, count_parameters
from lmforge.train.checkpoint import load_training_state, save_checkpoint
from lmforge.train.loop import evaluate, lr_at, make_optimizer

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


def test_evaluate_is_mean_token_loss_over_the_fixed_set(tmp_path):
    path = tmp_path / "val.npy"
    np.save(path, np.random.default_rng(0).integers(0, VOCAB, 16 * 10 + 1).astype(np.uint16))
    val = ValidationSet(str(path), TINY.block_size, 0, 1, batch_size=3, max_batches=2)
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


@pytest.fixture
def trained(tmp_path, tokenizer_dir):
    """A model and optimizer after 3 steps, checkpointed at step 3."""
    model = tiny(seed=0)
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    train_steps(model, opt, 3)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, tokenizer_dir, opt, step=3, metrics={"val_loss": 1.5})
    return model, opt, ckpt


def test_checkpoint_is_hugging_face_format(trained):
    model, _, ckpt = trained
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert "pytorch_model.bin" not in names
    reloaded = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    x, _ = fixed_batch(1)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.decode(tok.encode("the fox", add_special_tokens=False)) == "the fox"


def test_load_training_state_restores_weights_optimizer_and_step(trained):
    model, opt, ckpt = trained
    fresh = tiny(seed=1)
    fresh_opt = make_optimizer(fresh, TrainConfig(lr=1e-2))
    assert not torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)

    meta = load_training_state(ckpt, fresh, fresh_opt)
    assert meta["step"] == 3 and meta["attempt"] == 1

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
    load_training_state(ckpt, resumed, resumed_opt)
    assert train_steps(resumed, resumed_opt, 3) == uninterrupted
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_training_state_restores_the_rng(tmp_path, tokenizer_dir):
    model = tiny()
    opt = make_optimizer(model, TrainConfig())
    torch.manual_seed(123)
    save_checkpoint(tmp_path / "c", model, tokenizer_dir, opt, step=1, metrics={})
    expected = torch.rand(5)
    other = tiny(seed=9)  # reseeds the RNG
    load_training_state(tmp_path / "c", other, make_optimizer(other, TrainConfig()))
    assert torch.equal(torch.rand(5), expected)
