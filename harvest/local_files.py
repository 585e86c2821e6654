"""Local dataset files (.txt, .jsonl/.json, .parquet) read one document at a time, by us rather than by the
`datasets` builders, so that one document that cannot be read is skipped and named instead of ending the harvest.

A bad document (invalid UTF-8, a malformed JSON line, a row without a string in the text column, the rest of a
corrupt Parquet file) becomes a `Skipped` record in the stream, in the slot the document would have had: the
documents after it keep their indices, so a resume position (document index, token offset) stays exact and a
rerun reads the same stream. Splitting follows the `datasets` builders this replaces (text: sample_by="paragraph",
json: one object per line or one array), so caches made through them resume onto the same documents.
A file that cannot be opened or read at all (permissions, I/O error) is not a property of the data: it stops
the harvest with its name, and rerunning resumes once it is readable.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sae_cache.sae_common.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
CHUNK_BYTES = 10 << 20  # read size, as the text builder's chunksize; any size splits the same way


class DataError(UserError):
    """A dataset that cannot be found or read, or lacks the text column."""


@dataclass(frozen=True)
class Skipped:
    """A document that could not be read: where it is (`unit` line, row or item number, 1-based) and why."""

    file: str
    unit: str
    number: int
    reason: str

    def record(self) -> dict[str, Any]:
        return {"file": self.file, self.unit: self.number, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.file} {self.unit} {self.number}: {self.reason}"


def read_rows(files: list[str], text_column: str) -> Iterator[dict[str, Any]]:
    """Rows {"text": str, "skipped": None} or {"text": None, "skipped": asdict(Skipped)}, file by file: the
    generator `datasets.IterableDataset.from_generator` shards by file, so shuffling works as for its builders."""
    for file in files:
        reader = {".txt": _text_documents, ".parquet": _parquet_documents}.get(Path(file).suffix, _json_documents)
        try:
            for doc in reader(file, text_column):
                yield {"text": None, "skipped": asdict(doc)} if isinstance(doc, Skipped) else {"text": doc, "skipped": None}
        except OSError as e:
            raise DataError(f"cannot read {file}: {e.strerror or e}; rerun the same command to resume once it is "
                            "readable") from e


def columns(file: str) -> list[str]:
    """The columns of a file's first readable document (for the message when the text column is missing)."""
    suffix = Path(file).suffix
    if suffix == ".txt":
        return ["text"]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(file).schema_arrow.names)
        except Exception:  # noqa: BLE001 - a corrupt file: its documents are skipped, naming it
            return []
    for row in _json_objects(file):
        if isinstance(row, dict):
            return list(row)
    return []


# -- text: one document per paragraph ----------------------------------------------------------------------


def _text_documents(file: str, text_column: str) -> Iterator[str | Skipped]:
    for line, raw in _paragraphs(file):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_line = line + raw.count(b"\n", 0, e.start)
            yield Skipped(file, "line", line, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} on line {bad_line})")


def _paragraphs(file: str) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) of each paragraph, split as the text builder does (universal newlines, split
    on "\\n\\n", empty pieces dropped), but on bytes so that a paragraph that is not UTF-8 spoils only itself.
    Splitting before decoding is exact: UTF-8 never uses the bytes of \\r or \\n inside a multi-byte character."""
    carry, carry_line = b"", 1
    with open(file, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            chunk += f.readline()  # end on a line break, so a \r\n pair is never cut
            pieces = (carry + chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")).split(b"\n\n")
            line = carry_line
            for piece in pieces[:-1]:
                if piece:
                    yield line, piece
                line += piece.count(b"\n") + 2
            carry, carry_line = pieces[-1], line
    if carry:
        yield carry_line, carry


# -- JSON: one object per line, or one array of objects or strings ------------------------------------------


def _json_documents(file: str, text_column: str) -> Iterator[str | Skipped]:
    unit = "item" if _is_array(file) else "line"
    for number, row in enumerate(_json_objects(file), start=1):
        if isinstance(row, Skipped):
            yield row
        elif row is None:  # a blank line: not a document
            continue
        elif not isinstance(row, dict) or not isinstance(row.get(text_column), str):
            yield Skipped(file, unit, number, f"not a JSON object with a string {text_column!r}")
        else:
            yield row[text_column]


def _json_objects(file: str) -> Iterator[Any]:
    """Each line's (or array item's) parsed value, None for a blank line, or a Skipped naming why it is not JSON.
    Numbered from 1 in the order yielded."""
    if _is_array(file):
        try:
            items = json.loads(Path(file).read_bytes().removeprefix(codecs.BOM_UTF8))
        except (UnicodeDecodeError, ValueError) as e:
            yield Skipped(file, "item", 1, f"the file is not a valid JSON array ({e}); none of it was read")
            return
        # An array of strings is a list of texts, as the json builder reads it.
        yield from ({"text": x} if isinstance(x, str) else x for x in items)
        return
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                yield None
                continue
            try:
                yield json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Skipped(file, "line", number, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            except ValueError as e:
                yield Skipped(file, "line", number, f"malformed JSON ({e})")


def _is_array(file: str) -> bool:
    with open(file, "rb") as f:
        return f.read(4).removeprefix(codecs.BOM_UTF8).startswith(b"[")


# -- Parquet: one document per row --------------------------------------------------------------------------


def _parquet_documents(file: str, text_column: str) -> Iterator[str | Skipped]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    with open(file, "rb") as f:  # a file that cannot be opened raises OSError here: not a skip
        try:
            parquet = pq.ParquetFile(f)
            if text_column not in parquet.schema_arrow.names:
                yield Skipped(file, "row", 1, f"the file has no column {text_column!r}; none of it was read")
                return
            for batch in parquet.iter_batches(columns=[text_column]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    yield text if isinstance(text, str) else Skipped(file, "row", row, f"{text_column!r} is not a string")
        except (pa.ArrowException, ValueError) as e:  # a corrupt file: what was read stays, the rest is one skip
            yield Skipped(file, "row", row + 1, f"unreadable from here on ({type(e).__name__}: {e})")
