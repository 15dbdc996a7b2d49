"""Build the Hugging Face causal LM a spec describes: GPT-2 or Llama from config (random
init), or a pretrained `AutoModelForCausalLM` to fine-tune."""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from lmforge.config import ModelConfig


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int,
                tracking_uri: str | None = None) -> PreTrainedModel:
    """The model to train, on the CPU in fp32. Seed torch first: the init is random.
    A `models:/` `model.pretrained` is downloaded from `tracking_uri`'s registry (once per
    machine)."""
    if cfg.pretrained:
        from lmforge.registry import local_model_dir  # MLflow only when a URI needs it

        return load_pretrained(local_model_dir(cfg.pretrained, tracking_uri, "model.pretrained"),
                               vocab_size, cfg.attn_implementation)
    if cfg.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.intermediate_size or _swiglu_width(cfg.n_embd),
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head or cfg.n_head,
            max_position_embeddings=cfg.block_size,
            attention_dropout=cfg.dropout,
            tie_word_embeddings=True,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        config._attn_implementation = cfg.attn_implementation
        return LlamaForCausalLM(config)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.intermediate_size,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    config._attn_implementation = cfg.attn_implementation
    return GPT2LMHeadModel(config)


def load_pretrained(path: str, vocab_size: int, attn_implementation: str) -> PreTrainedModel:
    """A local (or hub) checkpoint to fine-tune; safetensors only, never pickled weights."""
    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, torch_dtype="float32", attn_implementation=attn_implementation)
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(
            f"model.pretrained: {path!r} has {model.get_input_embeddings().num_embeddings} "
            f"token embeddings but the tokenizer has {vocab_size} tokens; use the model's own "
            "tokenizer (tokenizer.kind: pretrained, tokenizer.path: the same directory)")
    return model


def transformer_blocks(model: PreTrainedModel) -> list:
    """The repeated blocks (FSDP shards and activation checkpointing act per block)."""
    if hasattr(model, "get_base_model"):  # a peft model: the blocks of the model it adapts
        model = model.get_base_model()
    base = model.base_model
    blocks = getattr(base, "h", None) or getattr(base, "layers", None)
    if blocks is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return list(blocks)


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward + backward, plus attention's
    12 * layers * width * seq_len (the PaLM paper's appendix B estimate, as in nanoGPT).
    A frozen weight (LoRA's base) costs 4 per token, not 6: its backward computes the input's
    gradient but not its own."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()  # peft: the adapted model, adapters included
    cfg = model.config
    # Learned position embeddings are a lookup, not a matmul; token embeddings stay in N
    # because the (tied) output projection is a matmul with them.
    wpe = getattr(model.base_model, "wpe", None)
    n = count_parameters(model) - (wpe.weight.numel() if wpe is not None else 0)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if wpe is not None and not wpe.weight.requires_grad:
        frozen -= wpe.weight.numel()
    layers = cfg.num_hidden_layers
    width = cfg.hidden_size
    return 6 * n - 2 * frozen + 12 * layers * width * seq_len


def _swiglu_width(n_embd: int) -> int:
    # Llama's 2/3 * 4d for a gated MLP, rounded up to a multiple of 64.
    return -(-int(8 * n_embd / 3) // 64) * 64
