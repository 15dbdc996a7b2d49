"""Instruction and chat data (`data.format`, `lmforge.data.chat`): the assistant-token mask
against a hand-computed one, records and their errors, overlong examples, packing that
keeps examples apart (real tiny GPT-2 and Llama, sdpa and eager), and the entry the stage
writes read back as training batches. No Ray: blocks are packed in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from lmforge.config import DataConfig, ModelConfig, TokenizerConfig
from lmforge.data import chat, stage
from lmforge.data.blocks import BlockShard, ValidationSet
from lmforge.data.tokenizer import EOS, build_tokenizer
from lmforge.model import build_model
from lmforge.train.step import evaluate, lm_loss

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 ?.,!\n<|>_"


@pytest.fixture(scope="module")
def tok():
    """One token per character (so a mask can be written by hand), the default template."""
    t = build_tokenizer(TokenizerConfig(kind="char"), [ALPHABET])
    t.chat_template = chat.DEFAULT_CHAT_TEMPLATE
    return t


def hand_mask(text: str, assistant_spans: list[str]) -> list[int]:
    """1 on the characters of each assistant reply (and the end-of-text token after it)."""
    mask = [0] * len(text)
    at = 0
    for reply in assistant_spans:
        start = text.index(reply, at)
        mask[start:start + len(reply)] = [1] * len(reply)
        at = start + len(reply)
    return mask


def test_the_mask_is_the_assistant_replies_and_their_end_token(tok):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi?"},
                {"role": "assistant", "content": "hello."},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok"}]
    ids, mask = chat.render(tok, messages)
    # The template by hand: "<|role|>\n" + content + "\n" per turn; a reply is followed by
    # the end-of-text token (one token), and both are the assistant's.
    text = ("<|system|>\nbe brief\n<|user|>\nhi?\n<|assistant|>\nhello.\x00"
            "<|user|>\nagain\n<|assistant|>\nok\x00")
    assert tok.decode(ids) == text.replace("\x00", EOS)
    assert len(ids) == len(text)  # one token per character, \x00 standing for EOS
    assert mask == hand_mask(text, ["hello.\x00", "ok\x00"])
    assert sum(mask) == len("hello.") + 1 + len("ok") + 1


def test_instruction_records_render_as_a_user_and_an_assistant_turn(tok):
    record = {"instruction": "add", "input": "1 2", "output": "3"}
    assert chat.to_messages(record, "instruction") == [
        {"role": "user", "content": "add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    ids, mask = chat.render(tok, chat.to_messages({"instruction": "add", "output": "3",
                                                   "system": "math"}, "instruction"))
    text = "<|system|>\nmath\n<|user|>\nadd\n<|assistant|>\n3\x00"
    assert mask == hand_mask(text, ["3\x00"])


def test_sharegpt_conversations_map_to_messages():
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}]}
    assert [m["role"] for m in chat.to_messages(record, "chat")] == ["system", "user",
                                                                     "assistant"]


@pytest.mark.parametrize(("record", "fmt", "field"), [
    ({"instruction": "x"}, "instruction", "output: missing"),
    ({"instruction": 3, "output": "y"}, "instruction", "instruction: a int, not a string"),
    ({"text": "x"}, "chat", "messages: missing"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "chat", "messages[0].role: 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "chat", "messages: no assistant turn"),
    ({"conversations": [{"from": "gpt"}]}, "chat", "conversations[0].value: missing"),
])
def test_bad_records_name_the_field(record, fmt, field):
    with pytest.raises(chat.RecordError, match=field.replace("[", r"\[").replace("]", r"\]")):
        chat.to_messages(record, fmt)


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    stats = chat.Stats()
    ids, mask = list(range(10)), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert chat.fit(ids, mask, 6, "truncate", stats) == ([0, 1, 2, 3, 4, 5],
                                                         [0, 0, 0, 0, 1, 1])
    assert chat.fit(ids, mask, 6, "drop", stats) is None
    assert chat.fit(ids, mask, 3, "truncate", stats) is None  # no assistant token left
    assert chat.fit(ids[:5], mask[:5], 6, "drop", stats) == (ids[:5], mask[:5])
    assert vars(stats) == {"examples": 2, "truncated": 2, "dropped": 2,
                           "example_tokens": 11, "loss_tokens": 3}


def test_rows_pack_greedily_and_restart_positions():
    packer = chat.RowPacker(length=8, packing=True, pad_id=99)
    for n in (3, 4, 5, 2):
        packer.add([n] * n, [0] + [1] * (n - 1))
    rows = list(packer.rows(final=True))
    assert [tokens for _, tokens in rows] == [7, 7]
    first = rows[0][0]
    assert first[chat.TOKENS].tolist() == [3, 3, 3, 4, 4, 4, 4, 99]
    assert first[chat.POSITIONS].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]  # padding continues
    assert first[chat.LOSS].tolist() == [0, 1, 1, 0, 1, 1, 1, 0]
    x, y, positions = chat.batch_tensors(np.stack([first]))
    # The target of the last token of one example is never the next example's first token.
    assert y[0].tolist() == [3, 3, -100, 4, 4, 4, -100]
    assert positions[0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    unpacked = chat.RowPacker(length=8, packing=False, pad_id=99)
    for n in (3, 4):
        unpacked.add([n] * n, [0] + [1] * (n - 1))
    assert len(list(unpacked.rows(final=True))) == 2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_example_sees_only_itself(arch, attn):
    """The logits of example B packed after example A equal B's logits alone, and A's are
    A's alone: no token attends across the boundary, and positions restart."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, n_layer=2, n_embd=32, n_head=2, block_size=32,
                                    attn_implementation=attn), 50, 0).eval()
    a, b = torch.randint(1, 50, (1, 11)), torch.randint(1, 50, (1, 9))
    packed = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(9), torch.arange(9, 13)])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone_a = model(input_ids=a).logits
        alone_b = model(input_ids=b).logits
    torch.testing.assert_close(together[:, :11], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[:, 11:20], alone_b, atol=1e-5, rtol=1e-4)
    # Without restarted positions B would see A, and so it does with a KV cache (transformers
    # reads restarts as packing only without one): the check above can fail.
    with torch.no_grad():
        leaky = model(input_ids=packed).logits
        cached = model(input_ids=packed, position_ids=positions, use_cache=True).logits
    assert not torch.allclose(leaky[:, 11:20], alone_b, atol=1e-3)
    assert not torch.allclose(cached[:, 11:20], alone_b, atol=1e-3)


def chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"what is {i}?"},
                          {"role": "assistant", "content": f"it is {i}, " * (1 + i % 3)}]}
            for i in range(n)]


def chat_entry(tmp_path: Path, records: list[dict], block_size: int = 72, **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataConfig(path=str(path), format="chat", cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.2, **data)
    return stage.run_stage(cfg, TokenizerConfig(kind="char"), run_blocks=stage.local_blocks,
                           block_size=block_size), cfg


def test_the_stage_writes_rows_whose_labels_are_the_replies(tmp_path):
    result, _ = chat_entry(tmp_path, chat_records(40))
    m = result.manifest
    assert m.format == "chat" and m.block_size == 72 and m.stats["truncated"] == 0
    assert m.stats["examples"] == 40 and m.stats["dropped"] == 0
    summary = result.summary()
    assert summary["examples"] == 40 and summary["train_rows"] + summary["val_rows"] > 0
    data = stage.PreparedData(result.fingerprint, result.entry, m)
    tok = data.tokenizer()
    assert tok.chat_template == chat.DEFAULT_CHAT_TEMPLATE  # saved with the tokenizer
    shard = BlockShard(data, 72, rank=0, world_size=1, seed=0, batch_size=4, prefetch=0)
    replies, n_rows = [], sum(s.rows for s in m.train)
    for i in range(n_rows // 4):
        x, y, positions = shard.read(i)
        assert x.shape == y.shape == positions.shape == (4, 72)
        for row in y:
            labelled = [t for t in row.tolist() if t != -100]
            replies += [r for r in tok.decode(labelled).split(EOS) if r]
    # Every labelled token is a reply's (or its end token): the replies, and nothing else.
    expected = {r["messages"][1]["content"] for r in chat_records(40)}
    assert replies and set(replies) <= expected
    assert all("what is" not in r and "<|" not in r for r in replies)


def test_text_entries_keep_their_settings_and_fingerprint(tmp_path, write_jsonl):
    """The fine-tuning fields stay out of a text entry's settings, so its fingerprint (the
    cache key) is what it was before they existed."""
    text = stage.settings(DataConfig(), TokenizerConfig())
    assert set(text) == {"text_field", "sample_by", "val_fraction", "shard_tokens",
                         "block_bytes", "long_doc_chars", "tokenizer"}
    path = write_jsonl([{"text": "a b c"}])
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path))
    source = stage.list_corpus(cfg)
    tok = TokenizerConfig(kind="char")
    assert stage.fingerprint(source, cfg, tok) == stage.fingerprint(source, cfg, tok, 64)
    chat_cfg = cfg.model_copy(update={"format": "chat"})
    assert stage.fingerprint(source, chat_cfg, tok, 64) != stage.fingerprint(
        source, chat_cfg, tok, 32)


def test_drop_counts_overlong_examples_in_the_manifest(tmp_path):
    long = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "x" * 80}]}]
    result, _ = chat_entry(tmp_path, chat_records(10) + long * 3, overlong="drop")
    assert result.manifest.stats["dropped"] == 3 and result.manifest.stats["examples"] == 10


def test_a_bad_record_stops_the_stage_naming_file_and_field(tmp_path):
    records = chat_records(5) + [{"messages": [{"role": "robot", "content": "x"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataConfig(path=str(path), format="chat", cache_dir=str(tmp_path / "cache"))

    with pytest.raises(ValueError, match=r"chat.jsonl: messages\[0\].role: 'robot'"):
        stage.run_stage(cfg, TokenizerConfig(kind="char"), run_blocks=stage.local_blocks,
                        block_size=48)


def test_a_template_without_generation_is_refused_and_a_jinja_file_is_read(tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="data.chat_template: the template marks no"):
        chat_entry(tmp_path, chat_records(5), chat_template=str(plain))
    good = tmp_path / "good.jinja"
    good.write_text(chat.DEFAULT_CHAT_TEMPLATE.replace("<|{{ message['role'] }}|>",
                                                       "{{ message['role'] }}:"))
    result, _ = chat_entry(tmp_path, chat_records(5), chat_template=str(good))
    tok = AutoTokenizer.from_pretrained(Path(result.entry) / "tokenizer")
    assert tok.chat_template == good.read_text()


def test_text_format_refuses_a_chat_template():
    with pytest.raises(ValueError, match="data.chat_template is for data.format"):
        DataConfig(chat_template="x")


def test_validation_loss_is_on_assistant_tokens_only(tmp_path):
    """`evaluate` over rows equals the cross-entropy of the labelled tokens alone, and the
    packed and unpacked entries give the same loss (packing changes nothing a model sees)."""
    torch.manual_seed(0)
    model = None
    losses = {}
    for packing in (True, False):
        result, _ = chat_entry(tmp_path / str(packing), chat_records(60), packing=packing)
        data = stage.PreparedData(result.fingerprint, result.entry, result.manifest)
        if model is None:
            model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=72),
                                data.vocab_size, data.eos_id).eval()
        val = ValidationSet(data, 72, 0, 1, batch_size=64, max_batches=4)
        losses[packing] = evaluate(model, val, torch.device("cpu"))
        total, count = 0.0, 0
        for x, y, positions in val:
            logits = model(input_ids=x, position_ids=positions, use_cache=False).logits
            keep = y != -100
            total += F.cross_entropy(logits[keep], y[keep], reduction="sum").item()
            count += int(keep.sum())
        assert losses[packing] == pytest.approx(total / count, rel=1e-5)
        x, y, positions = next(iter(val))
        expected = F.cross_entropy(model(input_ids=x, position_ids=positions,
                                         use_cache=False).logits[y != -100],
                                   y[y != -100])
        assert lm_loss(model, x, y, positions).item() == pytest.approx(expected.item(),
                                                                       rel=1e-5)
    assert sum(s.rows for s in result.manifest.validation) > 1
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_the_promotion_gate_scores_the_held_out_replies(tmp_path):
    """For instruction/chat data the gate scores the assistant's held-out text only: the
    same summed loss `evaluate` finds on the rows, over the replies' characters."""
    from lmforge.registry import heldout_examples, loss_per_assistant_char

    result, _ = chat_entry(tmp_path, chat_records(60))
    data = stage.PreparedData(result.fingerprint, result.entry, result.manifest)
    examples = heldout_examples(data, max_chars=10**6)
    replies = {r["messages"][1]["content"] + EOS for r in chat_records(60)}
    starts = sum(int((np.load(Path(result.entry) / s.file)[:, chat.POSITIONS] == 0).sum())
                 for s in result.manifest.validation)
    assert len(examples) == starts > 1  # every held-out example
    assert all(ex[-1][1] and ex[-1][0] in replies for ex in examples)
    assert all(not ex[0][1] and ex[0][0].startswith("<|user|>") for ex in examples)
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=72),
                        data.vocab_size, data.eos_id).eval()
    per_char = loss_per_assistant_char(model, data.tokenizer(), examples)
    val = ValidationSet(data, 72, 0, 1, batch_size=64, max_batches=4)
    per_token = evaluate(model, val, torch.device("cpu"))
    chars = sum(len(text) for ex in examples for text, flag in ex if flag)
    tokens = sum(int((y != -100).sum()) for _, y, _ in val)
    assert per_char * chars == pytest.approx(per_token * tokens, rel=1e-4)


def test_the_saved_template_reaches_the_registered_model(tmp_path):
    """The entry's tokenizer (with the spec's template) goes into every checkpoint; the
    registered version's tokenizer, which `lmforge serve` loads and whose template
    `/v1/chat/completions` applies, renders chats exactly as training did."""
    from lmforge.config import RegistryConfig
    from lmforge.registry import load_model, register
    from lmforge.tracking import RunTracker, experiment_id

    template = chat.DEFAULT_CHAT_TEMPLATE.replace("<|{{ message['role'] }}|>",
                                                  "{{ message['role'] | upper }}:")
    result, _ = chat_entry(tmp_path, chat_records(20), chat_template=template)
    data = stage.PreparedData(result.fingerprint, result.entry, result.manifest)
    checkpoint = tmp_path / "checkpoint"
    torch.manual_seed(0)
    build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=72), data.vocab_size,
                data.eos_id).save_pretrained(checkpoint)
    for f in Path(data.tokenizer_dir).iterdir():  # as train.checkpoint copies it
        (checkpoint / f.name).write_bytes(f.read_bytes())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker.start(uri, experiment_id(uri, "chat", tmp_path / "art"), "run")
    registered = register(str(checkpoint), tracker, RegistryConfig(model_name="chat-tiny"),
                          {}, max_new_tokens=8)
    loaded = load_model(registered.uri, uri)
    assert loaded.tokenizer.chat_template == template
    turn = [{"role": "user", "content": "hi"}]
    assert loaded.tokenizer.apply_chat_template(turn, add_generation_prompt=True,
                                                tokenize=False) == "USER:\nhi\n<|assistant|>\n"


def test_rows_keep_the_order_resume_and_world_size_independence(tmp_path):
    """Rows are read in the same keyed order as token blocks: micro-batch i is the same
    global rows for 1 or 2 workers, and reading it again (a resume) gives the same rows."""
    result, _ = chat_entry(tmp_path, chat_records(120), packing=False)
    data = stage.PreparedData(result.fingerprint, result.entry, result.manifest)
    one = BlockShard(data, 72, rank=0, world_size=1, seed=3, batch_size=4, prefetch=0)
    two = [BlockShard(data, 72, rank=r, world_size=2, seed=3, batch_size=2, prefetch=0)
           for r in range(2)]
    for i in (0, 5, 17):
        whole = one.read(i)
        halves = [shard.read(i) for shard in two]
        for k in range(3):
            assert torch.equal(whole[k], torch.cat([h[k] for h in halves]))
        again = BlockShard(data, 72, rank=0, world_size=1, seed=3, batch_size=4).batch(i)
        assert all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))


def test_parquet_instruction_records_give_the_jsonl_examples(tmp_path):
    """The same alpaca records from .parquet (nested nulls for a missing `input`) and from
    .jsonl become the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"instruction": f"say {i}", "output": f"{i} " * (1 + i % 4)} |
               ({"input": "loudly"} if i % 3 == 0 else {}) for i in range(40)]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "p").mkdir()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "p" / "a.parquet")

    rows = {}
    for kind in ("j", "p"):
        cfg = DataConfig(path=str(tmp_path / kind), format="instruction",
                         cache_dir=str(tmp_path / f"cache-{kind}"))
        result = stage.run_stage(cfg, TokenizerConfig(kind="char"),
                                 run_blocks=stage.local_blocks, block_size=64)
        assert result.manifest.stats["examples"] == 40
        rows[kind] = np.concatenate([np.load(Path(result.entry) / s.file)
                                     for s in result.manifest.train])
    assert np.array_equal(rows["j"], rows["p"])


def test_a_bad_record_raised_in_a_ray_worker_comes_back_as_its_value_error():
    """Ray Data wraps a worker's exception (UserCodeException, then RayTaskError, whose
    text carries the remote traceback); `lmforge data` exits 2 on a ValueError, so the
    stage unwraps it."""
    from ray.exceptions import UserCodeException

    message = "data.path: /d/chat.jsonl: messages[0].role: 'bot' is not one of system"
    try:
        try:
            raise ValueError(message)
        except ValueError as inner:
            raise UserCodeException("UDF failed to process a data block.") from inner
    except UserCodeException as wrapped:
        assert stage.spec_error(wrapped) == message
    # The text of a RayTaskError whose cause did not survive pickling:
    assert stage.spec_error(RuntimeError(
        f"ray::MapBatches(pack_block)\nTraceback ...\nValueError: {message}")) == message
    assert stage.spec_error(RuntimeError("worker died")) is None
    assert stage.spec_error(ValueError("some other value error")) is None
