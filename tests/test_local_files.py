"""Reading local dataset files ourselves: the same documents as the `datasets` builders on good files, a bad
document skipped in its own slot (named by file and line), and resume positions that stay exact across it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_cache.harvest.local_files import Skipped
from sae_cache.harvest.text import Position, open_documents, pack_contexts
from tests.conftest import make_tokenizer


def builder_documents(builder: str, files: list[Path], shuffle_buffer: int = 0, **kwargs) -> list[str]:
    """The documents the `datasets` builder streams (how local files were read before we read them ourselves)."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs)
    if shuffle_buffer:
        ds = ds.shuffle(seed=3, buffer_size=shuffle_buffer)
    return [row["text"] for row in ds]


@pytest.mark.parametrize("shuffle_buffer", [0, 7])
def test_text_files_split_into_the_same_paragraphs_as_the_text_builder(tmp_path, shuffle_buffer):
    for i in range(3):  # CRLF and lone CR line ends, runs of blank lines, text after the last blank line
        paragraphs = ["\r\n".join(f"file {i} paragraph {j} line {k} é" for k in range(1 + j % 3)) for j in range(12)]
        (tmp_path / f"{i}.txt").write_bytes(("\n\n".join(paragraphs) + "\n\n\n\rtail\r\rend\n").encode())
    files = sorted(tmp_path.glob("*.txt"))
    ours = list(open_documents(str(tmp_path), "train", "text", shuffle_buffer=shuffle_buffer, seed=3))
    assert ours == builder_documents("text", files, shuffle_buffer, sample_by="paragraph")
    assert len(ours) == 3 * 14


def test_jsonl_and_json_array_files_read_as_the_json_builder_reads_them(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} ü", "id": i}) for i in range(9)) + "\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 1, "text": "last line, no newline"}))
    files = sorted(tmp_path.glob("*.jsonl"))
    assert list(open_documents(str(tmp_path), "train", "text")) == builder_documents("json", files)
    array = tmp_path / "arr" / "c.json"
    array.parent.mkdir()
    array.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert list(open_documents(str(array), "train", "text")) == builder_documents("json", [array]) == ["one", "two"]


def test_bad_documents_are_skipped_in_their_own_slot_naming_file_and_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good one\n\nbad \xff byte\nsecond line\n\nstill good\n")
    (tmp_path / "b.txt").write_bytes("next file\n\n".encode())
    docs = list(open_documents(str(tmp_path), "train", "text"))
    assert docs[0] == "good one" and docs[2:] == ["still good\n", "next file"]
    assert docs[1] == Skipped(str(tmp_path / "a.txt"), "line", 3, "invalid UTF-8 (byte 0xff on line 3)")

    lines = [b'{"text": "ok"}', b'{"text": "bad \xfe"}', b'{"text": broken', b"", b"[1]", b'{"id": 3}', b'{"text": "fine"}']
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines))
    docs = list(open_documents(str(tmp_path / "c.jsonl"), "train", "text"))
    assert docs[0] == "ok" and docs[-1] == "fine" and len(docs) == 6  # the blank line 4 is not a document
    assert [(d.number, d.reason.split(" (")[0]) for d in docs[1:-1]] == [
        (2, "invalid UTF-8"), (3, "malformed JSON"), (5, "not a JSON object with a string 'text'"),
        (6, "not a JSON object with a string 'text'")]


def test_a_corrupt_parquet_file_is_one_skip_and_the_next_file_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", None, "beta"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"text": ["gamma"]}), tmp_path / "c.parquet")
    docs = list(open_documents(str(tmp_path), "train", "text"))
    assert [d for d in docs if isinstance(d, str)] == ["alpha", "beta", "gamma"]
    assert [(Path(d.file).name, d.unit, d.number) for d in docs if isinstance(d, Skipped)] == [
        ("a.parquet", "row", 2), ("b.parquet", "row", 1)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_resuming_from_every_position_continues_exactly_across_skipped_documents(tokenizer):
    words = "the quick brown fox jumps over a lazy dog while seven wizards".split()
    docs: list[str | Skipped] = [" ".join(words[: 2 + (i * 5) % 11]) for i in range(40)]
    for i in (0, 7, 8, 21, 39):  # first, two in a row, middle, last
        docs[i] = Skipped("f.txt", "line", i, "invalid UTF-8")
    skipped: list[dict] = []
    whole = list(pack_contexts(docs, tokenizer, 8, True, skipped=skipped))
    assert [s["doc"] for s in skipped] == [0, 7, 8, 21, 39] and skipped[1] == {
        "doc": 7, "file": "f.txt", "line": 7, "reason": "invalid UTF-8"}
    good = [d for d in docs if isinstance(d, str)]
    stream = [t for d in good for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert [ids[1:] for ids, _ in whole] == [stream[i * 7:(i + 1) * 7] for i in range(len(stream) // 7)]
    for k, (_, position) in enumerate(whole):
        assert not isinstance(docs[position.doc], Skipped)  # no context ends in a document without tokens
        again: list[dict] = []
        rest = list(pack_contexts(docs, tokenizer, 8, True, position, skipped=again))
        assert rest == whole[k + 1:]
        assert again == [s for s in skipped if s["doc"] >= position.doc]


def test_a_position_at_the_start_counts_a_skipped_first_document(tokenizer):
    skipped: list[dict] = []
    out = list(pack_contexts([Skipped("f", "line", 1, "x"), "a b c d e f g h i j"], tokenizer, 4, False,
                             Position(0, 0), skipped))
    assert skipped == [{"doc": 0, "file": "f", "line": 1, "reason": "x"}] and out[0][1].doc == 1
