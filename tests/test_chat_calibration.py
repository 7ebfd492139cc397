"""Calibration conversations (``{"messages": [...]}`` lines): read, carried to workers,
and tokenized with the base model's chat template, whose text holds its own special
tokens; without a template, their plain "role: content" rendering."""

import json

import pytest
from transformers import AutoTokenizer

from builders import build_adapter, build_tiny_model, cli_merge
from iteris_daemon.calibration import CalibrationSet, Sample, read_jsonl, write_jsonl
from iteris_daemon.errors import CalibrationError
from iteris_daemon.lora import load_adapter
from iteris_daemon.model import BaseModel

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the market fell late"},
                {"role": "assistant", "content": "prices dropped"}]
# A template that starts with the tokenizer's own start token, as Llama-3's and most others do.
TEMPLATE = "[CLS]{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"


def test_conversations_are_read_written_and_carried(tmp_path):
    path = tmp_path / "calibration.jsonl"
    path.write_text(json.dumps({"text": "plain words"}) + "\n" + json.dumps({"messages": CONVERSATION}) + "\n")
    data = read_jsonl(path)
    plain, chat = data.samples
    assert plain == Sample("plain words") and plain.to_json() == ["plain words", None]  # as before conversations
    assert chat.messages == tuple((m["role"], m["content"]) for m in CONVERSATION)
    assert chat.text == "system: be brief\nuser: the market fell late\nassistant: prices dropped"
    assert [Sample.from_json(json.loads(json.dumps(s.to_json()))) for s in data.samples] == list(data.samples)
    write_jsonl(tmp_path / "again.jsonl", data.samples)
    assert read_jsonl(tmp_path / "again.jsonl").samples == data.samples


def test_a_conversation_lines_unrelated_fields_are_ignored_as_a_text_lines_are(tmp_path):
    """Chat data sets exported line by line (ultrachat_200k, no_robots: to_json) carry "prompt",
    "prompt_id" or "category" beside "messages": every line was refused, while a "text" line's
    extra fields were ignored. Only "text" or "target" beside "messages" is refused."""
    path = tmp_path / "calibration.jsonl"
    path.write_text(json.dumps({"prompt": "the market fell late", "prompt_id": "0f3c", "messages": CONVERSATION,
                                "category": "chat", "id": 7}) + "\n")
    (chat,) = read_jsonl(path).samples
    assert chat == Sample.conversation(tuple((m["role"], m["content"]) for m in CONVERSATION))


def test_the_shipped_example_file_reads_as_config_readme_says():
    """config/calibration.example.jsonl shows every line format: plain text, a target, a
    conversation."""
    from pathlib import Path

    samples = read_jsonl(Path(__file__).parents[1] / "config" / "calibration.example.jsonl").samples
    assert [s.target is not None for s in samples].count(True) == 1
    assert [s.messages is not None for s in samples].count(True) == 1 and len(samples) >= 3


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    base = build_tiny_model("llama", root / "base", "CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    adapters = [build_adapter(base, root / f"a{seed}", seed=seed, family="llama", task_type="CAUSAL_LM")
                for seed in range(2)]
    return base, adapters


@pytest.mark.parametrize("template", [TEMPLATE, None])
def test_a_conversation_is_tokenized_with_the_chat_template(llama, template, caplog):
    base_dir, adapter_dirs = llama
    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])])
    assert base.tokenizer.chat_template == TEMPLATE  # saved with the base model
    base.tokenizer.chat_template = template
    chat = Sample.conversation(tuple((m["role"], m["content"]) for m in CONVERSATION))
    (batch,) = base.batches(CalibrationSet((chat,), "test"), batch_size=4, max_length=128)
    ids = batch["input_ids"][0].tolist()
    tokenizer = base.tokenizer
    base.batches(CalibrationSet((chat,), "test"), batch_size=4, max_length=128)  # a merge reads a set twice or more
    warnings = [r for r in caplog.records if "has no chat template" in r.message]
    assert len(warnings) == (template is None)  # once per source, not once per pass
    if template is None:  # the plain rendering, with the tokenizer's own special tokens
        assert ids == tokenizer(chat.text)["input_ids"]
    else:
        rendered = "[CLS]<system> be brief <user> the market fell late <assistant> prices dropped "
        assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.cls_token_id) == 1  # no second start token
    assert batch["attention_mask"][0].tolist() == [1] * len(ids)


def test_a_sentence_pair_keeps_its_token_types_beside_a_conversation(tmp_path):
    """A file may mix sentence pairs and conversations: a pair batched with a conversation
    lost its token type ids (BERT read its second segment as the first), so the merge changed
    with the batch size and the order of the samples (RegMean's delta 45% apart, QA)."""
    base_dir = build_tiny_model("bert", tmp_path / "base", "SEQ_CLS")
    adapter = build_adapter(base_dir, tmp_path / "a", seed=0, family="bert")
    base = BaseModel(str(base_dir), [load_adapter(adapter)])
    base.tokenizer.chat_template = TEMPLATE
    pair = Sample("the market fell", text_pair="prices dropped late")
    chat = Sample.conversation(tuple((m["role"], m["content"]) for m in CONVERSATION))
    (together,) = base.batches(CalibrationSet((pair, chat), "mixed.jsonl"), batch_size=4, max_length=128)
    (alone,) = base.batches(CalibrationSet((pair,), "pairs.jsonl"), batch_size=4, max_length=128)
    expected = base.tokenizer("the market fell", "prices dropped late")
    row = [i for i in range(2) if together["input_ids"][i][: len(expected["input_ids"])].tolist()
           == expected["input_ids"]]
    assert len(row) == 1 and set(expected["token_type_ids"]) == {0, 1}
    width = len(expected["input_ids"])
    assert together["token_type_ids"][row[0]][:width].tolist() == expected["token_type_ids"]
    assert alone["token_type_ids"][0].tolist() == expected["token_type_ids"]
    assert together["token_type_ids"][1 - row[0]].eq(0).all()  # the conversation: one segment


def test_a_conversation_the_template_refuses_names_the_file(llama):
    """Llama-2- and Mistral-style templates raise on roles that do not alternate (a leading
    system message): a jinja2 traceback. Now a CalibrationError naming the set and roles."""
    base_dir, adapter_dirs = llama
    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])])
    base.tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                                    "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
                                    "{% endif %}{{ m['content'] }}{% endfor %}")
    chat = Sample.conversation((("system", "be brief"), ("user", "hi")))
    with pytest.raises(CalibrationError) as caught:
        base.batches(CalibrationSet((chat,), "tasks/chat.jsonl"), batch_size=4, max_length=128)
    assert str(caught.value) == ("tasks/chat.jsonl: the base model's chat template refuses a conversation with roles "
                                 "[system, user]: Conversation roles must alternate user/assistant")


def test_a_merge_reads_conversations(llama, tmp_path):
    base_dir, adapter_dirs = llama
    files = []
    for i, adapter in enumerate(adapter_dirs):
        files.append(tmp_path / f"chat{i}.jsonl")
        lines = [{"messages": [{"role": "user", "content": f"question {i} {j}"},
                               {"role": "assistant", "content": f"answer {j} for task {i}"}]} for j in range(6)]
        files[-1].write_text("".join(json.dumps(line) + "\n" for line in lines))
    given = [f"{adapter}={file}" for adapter, file in zip(adapter_dirs, files)]
    assert cli_merge(base_dir, given, tmp_path / "out", "--param", "iterations=2") == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [i["calibration"]["source"] for i in report["inputs"]] == [str(f) for f in files]
    assert all(t["fidelity_gap"] > 0 for t in report["tasks"].values())


def test_samples_longer_than_max_length_are_cut_with_one_warning_per_source(llama, caplog):
    """Samples past ``max_length`` were cut without a word (the README said "with a warning"):
    a conversation's cut falls on its end, the replies its adapter was trained on. One warning
    per source counts them; the ids are still what the tokenizer's own truncation gives."""
    base_dir, adapter_dirs = llama
    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])])
    tokenizer = base.tokenizer
    short, long = Sample("the market fell"), Sample(" ".join(["market"] * 40))
    chat = Sample.conversation((("user", "the market fell late"), ("assistant", " ".join(["prices dropped"] * 10))))
    rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in chat.messages], tokenize=False)
    for _ in range(2):  # a merge reads a set twice or more
        (batch,) = base.batches(CalibrationSet((long, short, chat), "tasks/long.jsonl"), batch_size=4, max_length=16)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows == [tokenizer(short.text)["input_ids"],  # sorted by length: untouched
                    tokenizer(rendered, add_special_tokens=False, truncation=True, max_length=16)["input_ids"],
                    tokenizer(long.text, truncation=True, max_length=16)["input_ids"]]
    assert len(rows[2]) == 16 and rows[2][-1] == tokenizer.sep_token_id  # the trailing special token kept
    full = max(len(tokenizer(long.text)["input_ids"]), len(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
    assert [r.getMessage() for r in caplog.records if "are cut" in r.getMessage()] == [
        f"tasks/long.jsonl: 2 of 3 samples are longer than max_length 16 and are cut at it (the longest has {full} "
        "tokens); a conversation is cut at its end, its last replies (1 of the 2 cut); a larger max_length (a strategy "
        "parameter) keeps more"]
    base.batches(CalibrationSet((short,), "tasks/short.jsonl"), batch_size=4, max_length=16)
    assert sum("are cut" in r.getMessage() for r in caplog.records) == 1  # none for a set that fits
    tokenizer.truncation_side = "left"  # the start is cut, and said so (it said "at its end")
    (batch,) = base.batches(CalibrationSet((chat,), "tasks/left.jsonl"), batch_size=4, max_length=16)
    assert batch["input_ids"][0].tolist() == tokenizer(rendered, add_special_tokens=False, truncation=True,
                                                       max_length=16)["input_ids"]
    assert [r.getMessage() for r in caplog.records if "left.jsonl" in r.getMessage()][0].endswith(
        "a conversation is cut at its start, its first turns (the tokenizer truncates on the left) (1 of the 1 cut); "
        "a larger max_length (a strategy parameter) keeps more")


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_huge_sample_is_tokenized_only_as_far_as_max_length_can_reach(llama, caplog, monkeypatch, side):
    """One 2.6 MB line (a 52 MB one took a merge worker past 10 GB and minutes) was tokenized
    whole, twice, to be cut at 16 tokens. Only what 16 tokens can cover is tokenized now, on
    the side the tokenizer's truncation keeps; the ids are still its own truncation's."""
    base_dir, adapter_dirs = llama
    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])])
    tokenizer = base.tokenizer
    tokenizer.truncation_side = side
    huge = Sample(" ".join(f"market{i % 7} fell" for i in range(200_000)))  # 2.6 MB
    expected = tokenizer(huge.text, truncation=True, max_length=16)["input_ids"]
    longest = []
    real_call = type(tokenizer).__call__

    def counted(self, text, *args, **kwargs):
        longest.append(max(map(len, text if isinstance(text, list) else [text])))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counted)
    (batch,) = base.batches(CalibrationSet((huge, Sample("prices rose")), "tasks/huge.jsonl"), batch_size=4,
                            max_length=16)
    assert batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist() == expected
    assert max(longest) <= 17 * max(256, max(map(len, tokenizer.get_vocab()))) < len(huge.text) // 100
    said = [r.getMessage() for r in caplog.records if "are cut" in r.getMessage()]
    assert len(said) == 1 and "1 of 2 samples are longer than max_length 16" in said[0], said
    assert "(the longest has more than " in said[0], said


def test_a_long_text_of_few_tokens_is_tokenized_whole(llama, caplog):
    """A tokenizer that drops whitespace, or reads a word over 100 characters as one [UNK],
    covers more characters per token than its longest token: cut at what max_length such
    tokens hold, these samples lost their content and were counted as cut (review RV12)."""
    base_dir, adapter_dirs = llama
    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])])
    samples = (Sample("short answer:" + " " * 40_000 + " the real content of this sample"),
               Sample("sequence " + "ACGT" * 10_000 + " is a gene"))
    for sample in samples:
        (batch,) = base.batches(CalibrationSet((sample,), "tasks/sparse.jsonl"), batch_size=4, max_length=64)
        assert batch["input_ids"][0].tolist() == base.tokenizer(sample.text)["input_ids"]  # all of it, < 64 tokens
    assert not [r for r in caplog.records if "are cut" in r.getMessage()]


def test_targets_on_a_decoder_only_model_are_not_used_with_one_warning(llama, caplog):
    """{"text": prompt, "target": completion}, the common SFT layout, merged on a causal LM
    exactly as {"text": prompt} without a word: only a teacher-forced encoder-decoder reads a
    target. Still not used (the inputs are the same), now with one warning per source."""
    base_dir, adapter_dirs = llama
    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])])
    prompts = [Sample("question: what fell late"), Sample("question: who loved the film")]
    given = CalibrationSet((Sample(prompts[0].text, "the market fell"), prompts[1]), "tasks/sft.jsonl")
    for _ in range(2):
        (batch,) = base.batches(given, batch_size=4, max_length=32)
    (plain,) = base.batches(CalibrationSet(tuple(prompts), "tasks/prompts.jsonl"), batch_size=4, max_length=32)
    assert batch.keys() == plain.keys() and all(batch[k].equal(plain[k]) for k in batch)
    assert [r.getMessage() for r in caplog.records if "target" in r.getMessage()] == [
        'tasks/sft.jsonl: 1 of 2 samples have a "target", which only an encoder-decoder model that generates reads '
        '(its decoder is teacher forced on it); LlamaForCausalLM is none: the targets are not used (put a completion '
        'in "text", after its prompt, or in the conversation)']


def test_targets_longer_than_max_length_are_counted_as_cut(tiny, caplog):
    """An encoder-decoder's target is cut at ``max_length`` too: it was cut without a word
    while its text was counted. A sample whose text and target are both cut counts once."""
    base_dir, adapter_dirs = tiny["t5"]  # SEQ_2_SEQ_LM: the decoder is teacher forced on the target
    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])])
    long = " ".join(["market"] * 40)
    samples = (Sample("the market fell", long), Sample(long, long), Sample("prices rose", "they did"))
    (batch,) = base.batches(CalibrationSet(samples, "tasks/t5.jsonl"), batch_size=4, max_length=16)
    expected = base.tokenizer(long, truncation=True, max_length=16)["input_ids"]
    labels = [row[row != -100].tolist() for row in batch["labels"]]
    assert labels.count(expected) == 2 and len(expected) == 16
    assert [r.getMessage() for r in caplog.records if "are cut" in r.getMessage()] == [
        f"tasks/t5.jsonl: 2 of 3 samples are longer than max_length 16 and are cut at it (the longest has "
        f"{len(base.tokenizer(long)['input_ids'])} tokens); a larger max_length (a strategy parameter) keeps more"]


def test_tokens_past_the_input_embedding_are_refused_naming_them(tmp_path, capsys):
    """A chat template's added tokens (``<|im_start|>``), the embedding not resized: every pass
    failed with an IndexError, which the block-by-block capture took for an unsupported
    architecture before the whole-model passes failed the same. Now the calibration set is
    refused, naming the tokens, their ids and the embedding's rows; nothing is written."""
    base = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})  # ids 30522, 30523
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    tokenizer.save_pretrained(base)
    adapters = [build_adapter(base, tmp_path / f"a{seed}", seed=seed, family="llama", task_type="CAUSAL_LM")
                for seed in range(2)]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    assert cli_merge(base, [f"{adapters[0]}={chat}", adapters[1]], tmp_path / "out") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"iteris-daemon: error: {chat}: its samples hold tokens past the input embedding of {base} (30522 rows): <|im_start|> "
        "(id 30522), <|im_end|> (id 30523). The tokenizer has 30524 tokens; its added ones need rows the model does "
        "not have: resize the embedding to the tokenizer, or calibrate with text and a chat template the model holds")
    assert not (tmp_path / "out").exists()
    assert cli_merge(base, adapters, tmp_path / "plain") == 0  # plain text the model holds merges as before


def test_the_report_counts_each_sets_samples_cut_at_max_length(llama, tmp_path):
    """The cut was only in the log; the report now says how many of each set's samples a pass
    cut (null where no pass read them: a data-free merge without its evaluation)."""
    base_dir, adapter_dirs = llama
    files = [tmp_path / "long.jsonl", tmp_path / "short.jsonl"]
    files[0].write_text("".join(json.dumps({"text": " ".join(["market"] * (8 + 20 * (j % 2)))}) + "\n"
                                for j in range(6)))  # 3 of 6 past 16 tokens
    files[1].write_text("".join(json.dumps({"text": f"prices fell {j}"}) + "\n" for j in range(6)))
    given = [f"{adapter}={file}" for adapter, file in zip(adapter_dirs, files)]
    for extra, expected in ((["--param", "max_length=16"], [3, 0]),
                            (["--strategy", "task_arithmetic", "--no-eval"], [None, None])):
        out = tmp_path / f"out{len(extra)}"
        assert cli_merge(base_dir, given, out, *extra) == 0
        report = json.loads((out / "merge_report.json").read_text())
        assert [i["calibration"]["samples_cut"] for i in report["inputs"]] == expected
