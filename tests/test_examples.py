"""Prompt/completion and conversational data: formats, loss masks and packing (bfd, none, wrapped), framework-free."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clm.config import TrainConfig
from clm.data import prepare_dataset, prepare_streaming
from clm.data.examples import conversation_pieces, data_format
from clm.data.packing import best_fit_decreasing, pack_group
from clm.errors import ClmError, ConfigError, DataError
from conftest import clm_main, eli5_rows, small_bpe_tokenizer, write_jsonl

# No {% generation %} markers, and no end-of-turn token of its own after a user turn: the mask must come from
# rendering turn by turn. The assistant turn ends with EOS (a special token), so none is added.
TEMPLATE = ("{% for m in messages %}{{ '<' + m['role'] + '>: ' + m['content'] + '\n' }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<assistant>: ' }}{% endif %}")
BARE_TEMPLATE = TEMPLATE.replace("{{ eos_token }}", "")  # no end of turn at all: clm adds EOS


@pytest.fixture(scope="module")
def tok():
    return small_bpe_tokenizer()


def qa_rows(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?", "completion": " " + " ".join(r["answers"]["text"])[: 40 + 13 * (i % 9)]}
            for i, r in enumerate(eli5_rows(n))]


def chat_rows(n: int) -> list[dict]:
    rows = []
    for i, r in enumerate(eli5_rows(n)):
        answers = r["answers"]["text"]
        rows.append({"messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": answers[0][: 30 + 7 * (i % 5)]},
                                  {"role": "user", "content": "More?"},
                                  {"role": "assistant", "content": answers[1][:25]}]})
    return rows


def config_for(path, **kw) -> TrainConfig:
    return TrainConfig(train_file=str(path), block_size=kw.pop("block_size", 64), **kw)


def segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each segment of a packed row (position ids restart at 0), padding included."""
    pos = row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def test_prompt_completion_ids_and_loss_mask(tmp_path, tok, own_cache):
    rows = qa_rows(12)
    path = write_jsonl(tmp_path / "qa.jsonl", rows)  # also the validation file: the train split keeps file order
    for only_completion in (True, False):
        extra = {} if only_completion else {"completion_only_loss": False}
        ds = prepare_dataset(config_for(path, packing="none", block_size=128, validation_file=str(path), **extra),
                             tok)
        assert ds.data_format == "prompt_completion" and ds.packing == "none"
        for source, row in zip(rows, ds["train"]):
            (ids, labels), *padding = segments(row)
            prompt = tok(source["prompt"])["input_ids"]
            completion = tok(source["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert ids == prompt + completion
            first = len(prompt) if only_completion else 1  # the first label is never predicted
            assert labels == [-100] * first + ids[first:]
            assert all(lab == -100 for _, labs in padding for lab in labs)


def test_named_columns_and_the_eli5_qa_preset(tmp_path, tok, own_cache):
    path = write_jsonl(tmp_path / "eli5.jsonl", eli5_rows(10))
    config = TrainConfig(preset="eli5_qa", train_file=str(path), block_size=256)
    assert (config.prompt_column, config.completion_column) == ("title", "answers.text")
    assert config.model_name_or_path == "distilbert/distilgpt2"  # the guide's recipe, its data as Q&A
    rows = prepare_dataset(config.replace(model_name_or_path=None), tok)["train"]
    (ids, labels), *_ = segments(rows[0])
    text = tok.decode(ids)
    assert text.startswith("Question") and "?" in text and text.count(" ") > 40  # answers joined after the title
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]).startswith(text.split("?", 1)[1][:20])


def test_any_chat_template_masks_exactly_the_assistant_turns(tok):
    messages = chat_rows(1)[0]["messages"]
    pieces = conversation_pieces(tok, TEMPLATE, messages)
    assert "".join(t for t, _ in pieces) == tok.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False)
    trained = [t for t, is_assistant in pieces if is_assistant]
    assert trained == [messages[2]["content"] + "\n" + tok.eos_token, messages[4]["content"] + "\n" + tok.eos_token]
    assert all("<user>" not in t for t in trained)


@pytest.mark.parametrize("template, adds_eos", [(TEMPLATE, False), (BARE_TEMPLATE, True)])
def test_messages_rows_train_the_replies_and_end_of_turn(tmp_path, tok, own_cache, template, adds_eos):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_rows(10) + [{"messages": [{"role": "user", "content": "Hi"}]}])
    (tmp_path / "t.jinja").write_text(template)
    ds = prepare_dataset(config_for(path, chat_template=str(tmp_path / "t.jinja"), block_size=256,
                                    packing="none", test_size=0.3), tok)
    assert ds.data_format == "messages" and ds.packing == "none"
    rows = list(ds["train"]) + list(ds["test"])
    assert len(rows) == 10  # the conversation with no assistant turn is dropped
    for row in rows:
        (ids, labels), *_ = segments(row)
        text = tok.decode(ids)
        trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert "<user>" not in trained and "<system>" not in trained and "Be brief" not in trained
        # both replies, each closed by EOS (the template's, or added where the template has none)
        assert trained.count(tok.eos_token) == 2 and ids.count(tok.eos_token_id) == 2
        assert text.count(tok.eos_token) == 2
    rendered = tok.apply_chat_template(chat_rows(1)[0]["messages"], chat_template=template, tokenize=False)
    assert (tok.eos_token not in rendered) == adds_eos


def test_best_fit_decreasing_places_each_item_in_the_tightest_bin():
    bins, at, n = best_fit_decreasing(np.array([5, 7, 3, 2, 4, 1]), 8)
    # 7 -> bin 0 (1 left); 5 -> bin 1 (3 left); 4 -> bin 2 (4 left); 3 -> bin 1 (tightest; 0 left);
    # 2 -> bin 2 (2 left); 1 -> bin 0 (tightest: 1 left, then full)
    assert n == 3 and bins.tolist() == [1, 0, 1, 2, 2, 0] and at.tolist() == [0, 0, 5, 4, 0, 7]


def test_bfd_rows_hold_whole_examples_and_score_the_tokens_none_scores():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=200)
    lengths[:3] = [64, 100, 130]  # one exactly a block, two longer: split into pieces
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(3, 300, size=offsets[-1]).astype(np.int32)
    labels = np.where(rng.random(offsets[-1]) < 0.3, -100, ids).astype(np.int32)
    bfd, stats = pack_group(ids, labels, offsets, 64, "bfd", pad_id=0)
    none, none_stats = pack_group(ids, labels, offsets, 64, "none", pad_id=0)
    assert stats.split == 2 and none_stats.rows == 200 + 1 + 2 and stats.rows < none_stats.rows / 2
    assert stats.tokens == none_stats.tokens == offsets[-1] and stats.padding < none_stats.padding

    def pieces(rows):
        return [(tuple(i), tuple(lab)) for r in range(len(rows["input_ids"]))
                for i, lab in segments({k: v[r].tolist() for k, v in rows.items()})]

    def real(rows):  # the segments that are examples (padding is pad ids with no labels)
        return sorted(p for p in pieces(rows) if any(t != 0 for t in p[0]))

    assert real(bfd) == real(none)  # the same pieces, so the same tokens scored
    for seg_ids, seg_labels in pieces(bfd):
        assert seg_labels[0] == -100  # nothing in the row predicts a piece's first token
    assert bfd["position_ids"].max() < 64 and (bfd["input_ids"].shape == (stats.rows, 64))


def test_streamed_bfd_rows_equal_prepared_rows(tmp_path, tok, own_cache):
    train = write_jsonl(tmp_path / "qa.jsonl", qa_rows(30))
    valid = write_jsonl(tmp_path / "valid.jsonl", qa_rows(5))
    config = config_for(train, validation_file=str(valid))
    prepared = prepare_dataset(config, tok)
    streamed = prepare_streaming(config.replace(streaming=True, max_steps=5), tok, shuffle_buffer=1)
    assert list(streamed["train"]) == list(prepared["train"])
    assert list(streamed["test"]) == list(prepared["test"])
    assert set(prepared["train"].column_names) == {"input_ids", "labels", "position_ids"}


def test_packing_choices_and_what_prepare_saves(tmp_path, tok, own_cache):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(20))
    eli5 = write_jsonl(tmp_path / "eli5.jsonl", eli5_rows(20))
    columns = {name: prepare_dataset(config_for(qa, packing=name), tok)["train"].column_names
               for name in ("wrapped", "bfd", "none")}
    assert columns == {"wrapped": ["input_ids", "labels"], "bfd": ["input_ids", "labels", "position_ids"],
                       "none": ["input_ids", "labels", "position_ids"]}
    text = prepare_dataset(config_for(eli5), tok)
    assert text.data_format == "text" and text["train"].column_names == ["input_ids"]  # today's blocks
    text_bfd = prepare_dataset(config_for(eli5, packing="bfd"), tok)["train"]
    assert all(row["labels"][0] == -100 for row in text_bfd)
    out = tmp_path / "prepared"
    code, _ = clm_main("prepare", "--train_file", str(qa), "--tokenizer_name", str(_save(tok, tmp_path)),
                       "--block_size", "64", "--output_dir", str(out))
    from datasets import load_from_disk

    assert code == 0 and load_from_disk(str(out))["train"].column_names == ["input_ids", "labels", "position_ids"]


def _save(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_format_detection_and_one_line_errors(tmp_path, tok, own_cache):
    assert data_format(["prompt", "completion"], TrainConfig()) == "prompt_completion"
    assert data_format(["messages"], TrainConfig()) == "messages"
    assert data_format(["title", "answers.text"], TrainConfig()) == "text"
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(10))
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(10))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": "not a conversation"}] * 4)
    tok_dir = str(_save(tok, tmp_path))
    cases = [
        (["--train_file", str(qa), "--prompt_column", "question", "--completion_column", "completion"],
         "column 'question' not found"),
        (["--train_file", str(qa), "--prompt_column", "prompt"], "go together"),
        (["--train_file", str(chat)], "no chat template; pass --chat_template FILE"),
        (["--train_file", str(chat), "--chat_template", str(tmp_path / "missing.jinja")], "is not a file"),
        (["--train_file", str(bad), "--chat_template", str(tmp_path / "t.jinja")], "must be a list of"),
        (["--train_file", str(qa), "--assistant_only_loss"], "--assistant_only_loss does not apply"),
        (["--train_file", str(qa), "--packing", "bfd", "--keep_remainder"], "--keep_remainder is for"),
        (["--train_file", str(qa), "--packing", "zigzag"], "invalid choice"),
    ]
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    for argv, message in cases:
        code, _ = clm_main("prepare", "--tokenizer_name", tok_dir, "--output_dir", str(tmp_path / "p"), *argv)
        assert code == 2, argv
    with pytest.raises(ClmError, match="column 'question' not found"):
        prepare_dataset(config_for(qa, prompt_column="question", completion_column="completion"), tok)
    with pytest.raises(DataError, match="no chat template"):
        prepare_dataset(config_for(chat), tok)
    with pytest.raises(ConfigError, match="does not apply: the data is plain text"):
        prepare_dataset(config_for(write_jsonl(tmp_path / "e.jsonl", eli5_rows(8)), completion_only_loss=True), tok)
    assert not (tmp_path / "p").exists()  # nothing half-written


def test_a_template_that_rewrites_earlier_turns_is_refused_unless_every_token_trains(tok):
    # Renders only the last message: earlier turns vanish when one is added, so turn boundaries cannot be found
    template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    messages = chat_rows(1)[0]["messages"]
    with pytest.raises(DataError, match="turn by turn"):
        conversation_pieces(tok, template, messages)


def test_example_rows_show_their_prompts_as_samples(tmp_path, tok, own_cache):
    from clm.samples import choose_prompts

    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(20))
    test = prepare_dataset(config_for(path, block_size=128), tok)["test"]
    prompts = choose_prompts(TrainConfig(), tok, test)
    assert len(prompts) == 2 and all(p.startswith("Question") and p.endswith("?") for p in prompts)


def test_results_say_which_tokens_the_loss_counts():
    from clm.runner import data_description

    class Splits(dict):
        data_format, packing = "messages", "bfd"

    assert data_description(Splits(), TrainConfig()) == {"data_format": "messages", "packing": "bfd",
                                                        "loss_tokens": "assistant tokens"}
    assert data_description(Splits(), TrainConfig(assistant_only_loss=False))["loss_tokens"] == "all tokens"
    assert data_description({}, TrainConfig())["loss_tokens"] == "all tokens"
    assert json.dumps(data_description({}, TrainConfig()))
