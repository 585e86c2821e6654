"""Text -> packed token contexts, with a position that lets a resumed harvest continue exactly where it was.

Documents are tokenized without special tokens, each followed by a separator (EOS, or BOS when the tokenizer
has no EOS), concatenated, and cut into contexts of `context_size` tokens; with `prepend_bos` each context is
BOS + (context_size - 1) tokens. A context's position is (document index, token offset into that document's
tokens incl. its separator) of its first non-BOS token, so resuming skips documents without tokenizing them.
A document that could not be read (`Skipped`) keeps its index and contributes no tokens, not even a separator.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_cache.harvest.local_files import SUFFIXES, DataError, Skipped, read_rows
from sae_cache.harvest.local_files import columns as local_columns
from sae_cache.sae_common.model import ASSETS

TOKENIZE_GROUP = 64  # documents tokenized per call (fast tokenizers batch well)
# Text shipped with the project (scripts/train_tiny_lm.py): stdlib prose the built-in model never trained on,
# one document per paragraph.
BUILTIN_DATASETS = {"stdlib-sample": ASSETS / "stdlib-sample.txt"}


@dataclass(frozen=True)
class Position:
    doc: int = 0
    offset: int = 0


def local_files(dataset: str) -> list[str] | None:
    """The files a local dataset names (a built-in name, a file, a folder or a glob), or None if not local."""
    if dataset in BUILTIN_DATASETS:
        return [str(BUILTIN_DATASETS[dataset])]
    path = Path(dataset).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"the folder {dataset} holds no {', '.join(SUFFIXES)} files")
        return files
    if path.is_file():
        return [str(path)]
    if any(c in dataset for c in "*?["):
        files = sorted(glob.glob(str(path), recursive=True))
        if not files:
            raise DataError(f"no files match {dataset}")
        return files
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in SUFFIXES:
        raise DataError(f"{dataset} does not exist")
    return None


def open_documents(dataset: str, split: str, text_column: str, *, shuffle_buffer: int = 0,
                   seed: int = 0) -> Iterable[str | Skipped]:
    """A stream of document texts from a hub dataset (streamed) or local files, in a fixed order. A local
    document that cannot be read is a `Skipped` in its place (local_files.py)."""
    import datasets

    files = local_files(dataset)
    try:
        if files is not None:
            suffixes = {Path(f).suffix for f in files}
            if len(suffixes) != 1 or next(iter(suffixes)) not in SUFFIXES:
                raise DataError(f"{dataset} mixes or has unsupported file types {sorted(suffixes)}; "
                                f"use one of {', '.join(SUFFIXES)}")
            found = local_columns(files[0])
            if text_column not in found:
                raise DataError(f"the dataset {dataset!r} has no column {text_column!r}; its columns are: "
                                f"{', '.join(found) or 'none readable'}. Choose one with --text-column")
            ds = datasets.IterableDataset.from_generator(read_rows, gen_kwargs={"files": files,
                                                                                "text_column": text_column})
            text_column = "text"  # read_rows' rows hold the chosen column under this name
            first = next((row for row in ds if row["skipped"] is None), None)
        else:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
            first = next(iter(ds), None)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - network, unknown id, bad split: the reason is the message
        raise DataError(f"cannot read the dataset {dataset!r} (split {split!r}): {type(e).__name__}: {e}") from e
    if first is None:
        raise DataError(f"the dataset {dataset!r} (split {split!r}) has no readable document")
    if text_column not in first:
        raise DataError(f"the dataset {dataset!r} has no column {text_column!r}; its columns are: "
                        f"{', '.join(first)}. Choose one with --text-column")
    if shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return _documents(ds, dataset, text_column)


def _documents(ds: Iterable[dict], dataset: str, text_column: str) -> Iterator[str | Skipped]:
    """Each row's text, or a Skipped; an error while streaming (a hub dataset's network) names how far it got."""
    n_read = 0
    try:
        for row in ds:
            n_read += 1
            text = row.get(text_column)
            if isinstance(text, str):
                yield text
            elif row.get("skipped") is not None:
                yield Skipped(**row["skipped"])
            else:  # a hub dataset's row without text
                yield Skipped(dataset, "row", n_read, f"{text_column!r} is {type(text).__name__}, not a string")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - every shard written so far is kept; the rerun resumes
        raise DataError(f"reading the dataset {dataset!r} failed after {n_read:,} documents: {type(e).__name__}: "
                        f"{e}; the cache keeps its complete shards: rerun the same command to resume") from e


def separator_id(tokenizer: Any) -> int:
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise DataError("the tokenizer has neither an EOS nor a BOS token to separate documents")
    return int(sep)


@dataclass(frozen=True)
class TokenizeSplit:
    """Tokenizing shared by the ranks of a job that all read the same documents: of each round of `size` groups
    of documents, rank `rank` tokenizes one and `gather` (an all_gather among the ranks) brings every rank all
    of them. It stops after the round that reaches `max_tokens` of the stream (the same round on every rank),
    so no rank is left waiting in a gather the others never join."""

    rank: int
    size: int
    gather: Callable[[Any], list]
    max_tokens: int


def pack_contexts(docs: Iterable[str | Skipped], tokenizer: Any, context_size: int, prepend_bos: bool,
                  start: Position = Position(), skipped: list[dict] | None = None, split: TokenizeSplit | None = None
                  ) -> Iterator[tuple[list[int], Position]]:
    """Yield (context token ids, position of the NEXT context) from `start` on. Each Skipped document is
    appended to `skipped` as {"doc": index, ...its record} before any context after it is yielded. With
    `split`, the ranks tokenize the documents between them; the contexts are the same."""
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise DataError("--prepend-bos needs a tokenizer with a BOS token; this one has none (use --no-prepend-bos)")
    sep = separator_id(tokenizer)
    body = context_size - 1 if prepend_bos else context_size
    head = [bos] if prepend_bos else []
    buf: list[int] = []
    docs = itertools.islice(docs, start.doc, None)  # skipping documents costs no tokenization
    groups = _groups(docs, start.doc)
    for group_start, group, encoded in (_split_encoded(groups, tokenizer, split, start.offset) if split else
                                        ((i, g, _encode(tokenizer, g)) for i, g in groups)):
        encoded = iter(encoded)
        for doc, text in enumerate(group, start=group_start):
            if not isinstance(text, str):
                if skipped is not None:
                    skipped.append({"doc": doc, **text.record()})
                continue
            ids = next(encoded) + [sep]
            offset = start.offset if doc == start.doc else 0
            ids = ids[offset:]
            carried = len(buf)
            buf.extend(ids)
            n_full = len(buf) // body
            for j in range(n_full):
                # Context j ends inside this document (n_full > 0 implies body > carried), so the next
                # context starts at this document's offset + (j + 1) * body - carried.
                yield head + buf[j * body:(j + 1) * body], Position(doc, offset + (j + 1) * body - carried)
            del buf[:n_full * body]


def _groups(docs: Iterable[str | Skipped], first_index: int) -> Iterator[tuple[int, list[str | Skipped]]]:
    it = iter(docs)
    index = first_index
    while group := list(itertools.islice(it, TOKENIZE_GROUP)):
        yield index, group
        index += len(group)


def _encode(tokenizer: Any, group: list[str | Skipped]) -> list[list[int]]:
    texts = [d for d in group if isinstance(d, str)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _split_encoded(groups: Iterator[tuple[int, list]], tokenizer: Any, split: TokenizeSplit, offset: int
                   ) -> Iterator[tuple[int, list, list[list[int]]]]:
    """(first index, group, its documents' token ids) for each group, each rank tokenizing one group a round.
    Token ids travel as one int32 array and the lengths (4 bytes a token)."""
    tokens = -offset  # of the stream from the start position: the first document's first `offset` are not in it
    while tokens < split.max_tokens:
        round_ = list(itertools.islice(groups, split.size))  # every rank reads the same documents: same rounds
        mine = None
        if split.rank < len(round_):
            ids = _encode(tokenizer, round_[split.rank][1])
            mine = (np.fromiter(itertools.chain.from_iterable(ids), np.int32), np.array([len(i) for i in ids], dtype=np.int64))
        for (first, group), (flat, lengths) in zip(round_, split.gather(mine)):
            ends = np.cumsum(lengths).tolist()
            flat = flat.tolist()
            yield first, group, [flat[e - n:e] for e, n in zip(ends, lengths.tolist())]
            tokens += ends[-1] + len(lengths) if ends else 0  # each document's tokens and its separator
        if len(round_) < split.size:
            return
