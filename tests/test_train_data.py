"""Data files -> rows -> formats -> token ids with label masks, checked token by token."""

import json

import pytest
import torch

from peftkit.train.examples import IGNORE, Collator, encode, load_examples, pack, prompt_ids
from peftkit.train.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, detect_format, to_sample
from peftkit.train.rows import DataError, Row, read_rows
from train_fixtures import tiny_tokenizer

ROWS = [{"prompt": "ab", "completion": "c"}, {"prompt": "d", "completion": "ef"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "datasets"])
def test_every_file_kind_reads_the_same_rows(tmp_path, kind):
    import datasets

    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "csv":
        path.write_text("prompt,completion\nab,c\nd,ef\n")
    elif kind == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    assert [r.data for r in read_rows(str(path))] == ROWS


def test_prompt_completion_mask(tok):
    row = Row({"prompt": "ab", "completion": "c"}, "f:1")
    ex = encode(to_sample(row, detect_format(row), tok), tok, "prompt_completion")
    a, b, c, eos = ids(tok, "abc") + [tok.eos_token_id]
    assert ex["input_ids"] == [a, b, c, eos]
    assert ex["labels"] == [IGNORE, IGNORE, c, eos]


def test_bos_is_prepended_and_masked_when_the_tokenizer_adds_it():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    row = Row({"prompt": "a", "completion": "b"}, "f:1")
    sample = to_sample(row, "prompt_completion", tok)
    ex = encode(sample, tok, "prompt_completion")
    assert ex["input_ids"] == [tok.bos_token_id] + ids(tok, "ab") + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE, IGNORE] + ids(tok, "b") + [tok.eos_token_id]
    assert prompt_ids(sample, tok, "prompt_completion") == [tok.bos_token_id] + ids(tok, "a")


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_mask(tok, with_input):
    data = {"instruction": "add", "output": "3"}
    if with_input:
        data["input"] = "1 2"
    row = Row(data, "f:1")
    assert detect_format(row) == "alpaca"
    ex = encode(to_sample(row, "alpaca", tok), tok, "alpaca")
    template = ALPACA_WITH_INPUT if with_input else ALPACA_NO_INPUT
    prompt = ids(tok, template.format(instruction="add", input="1 2"))
    target = ids(tok, "3") + [tok.eos_token_id]
    assert ex["input_ids"] == prompt + target
    assert ex["labels"] == [IGNORE] * len(prompt) + target


def test_chat_mask_covers_every_assistant_turn_and_nothing_else(tok):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"},
                {"role": "assistant", "content": "z"}]
    row = Row({"messages": messages}, "f:1")
    sample = to_sample(row, detect_format(row), tok)
    ex = encode(sample, tok, "chat")
    S, E = "<|im_start|>", "<|im_end|>"
    pieces = [(f"{S}system\ns{E}\n{S}user\nhi{E}\n{S}assistant\n", False), (f"yo{E}\n", True),
              (f"{S}user\nx{E}\n{S}assistant\n", False), (f"z{E}\n", True)]
    want_ids, want_labels = [], []
    for text, target in pieces:
        piece = ids(tok, text)
        want_ids += piece
        want_labels += piece if target else [IGNORE] * len(piece)
    assert ex["input_ids"] == want_ids == ids(tok, tok.apply_chat_template(messages, tokenize=False))
    assert ex["labels"] == want_labels
    assert sample.answer == "z"
    assert prompt_ids(sample, tok, "chat") == ids(tok, "".join(p for p, _ in pieces[:3]))


def test_truncation_is_counted_and_rows_without_targets_dropped(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abcdef", "completion": "gh"},
                                              {"prompt": "a", "completion": "b"},
                                              {"prompt": "abcd", "completion": "e"}])
    data = load_examples(path, tok, max_length=5)
    assert (data.truncated, data.dropped, len(data.examples)) == (2, 1, 2)
    assert data.examples[0]["input_ids"] == ids(tok, "ab") + [tok.eos_token_id]
    assert data.examples[1]["labels"] == [IGNORE] * 4 + ids(tok, "e")
    assert "truncated 2 of 3 rows" in data.notes[0]


def test_packing_keeps_each_example_separate(tok):
    from peftkit import models

    model = models.tiny_llama(0, vocab_size=len(tok))
    examples = [{"input_ids": [7, 8, 9, 10], "labels": [IGNORE, IGNORE, 9, 10]},
                {"input_ids": [11, 12, 13], "labels": [IGNORE, 12, 13]},
                {"input_ids": [14, 15, 16, 17, 18], "labels": [IGNORE, 15, 16, 17, 18]}]
    packed = pack(examples, max_length=8)
    assert [len(p["input_ids"]) for p in packed] == [7, 5]
    assert packed[0]["position_ids"] == [0, 1, 2, 3, 0, 1, 2]
    batch = Collator(pad_id=1)(packed)
    assert batch["attention_mask"].shape == (2, 1, 7, 7)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, start, ex in ((0, 0, examples[0]), (0, 4, examples[1]), (1, 0, examples[2])):
            alone = model(torch.tensor([ex["input_ids"]])).logits[0]
            n = len(ex["input_ids"])
            torch.testing.assert_close(packed_logits[row, start:start + n], alone)


def test_packing_masks_each_examples_first_label():
    """A target as an example's first token would be learned from the previous example's last
    token; packing masks it (as DataCollatorWithFlattening does) and keeps every other label."""
    examples = [{"input_ids": [7, 8], "labels": [7, 8]},
                {"input_ids": [9, 10], "labels": [9, 10]},
                {"input_ids": [11], "labels": [IGNORE]}]
    packed = pack(examples, max_length=8)
    assert packed == [{"input_ids": [7, 8, 9, 10, 11], "labels": [IGNORE, 8, IGNORE, 10, IGNORE],
                       "position_ids": [0, 1, 0, 1, 0]}]


def test_collator_pads_ids_labels_and_mask():
    batch = Collator(pad_id=1)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
                                {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# -- bad input -------------------------------------------------------------------------------

def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", \n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        read_rows(str(path))


def test_malformed_csv_row_names_file_and_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc\n")
    with pytest.raises(DataError, match=rf"{path}:3: malformed CSV"):
        read_rows(str(path))


def test_missing_field_names_the_field_and_the_formats(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                              {"prompt": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'completion'.*Accepted formats"):
        load_examples(path, tok)
    with pytest.raises(DataError, match=r"missing field 'output'.*instruction"):
        detect_format(Row({"instruction": "x"}, "f:1"))
    with pytest.raises(DataError, match=r"f:1: no known fields \(found \['text'\]\).*messages"):
        detect_format(Row({"text": "x"}, "f:1"))


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_dataset_is_an_error(tmp_path, content):
    path = tmp_path / ("d.json" if content == "[]" else "d.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match="empty"):
        read_rows(str(path))


def test_non_object_row_and_unknown_extension(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], [1, 2]])
    with pytest.raises(DataError, match=r"d.jsonl:2: expected a JSON object"):
        read_rows(path)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        read_rows(str(tmp_path / "d.txt"))
