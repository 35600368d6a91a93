"""Input records: JSONL (plain or .gz/.bz2/.xz/.zst) or Parquet files (local paths or fsspec URLs)
-> validated chats.

A record is either a chat (`messages`: list of {role, content}) or a pair
(`prompt`, `response`), with an optional `id` (else a stable hash of the content)
and an optional `domain`. Problems raise BadRecordError naming the file and line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from teacher_cache.errors import one_line, parse_json

ROLES = ("system", "user", "assistant")


class BadRecordError(ValueError):
    """A malformed input record; `where` is 'file:line'."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why


class DataFileError(ValueError):
    """A data file that cannot be read at all (missing, empty, unknown format)."""


@dataclass(frozen=True)
class Record:
    """One validated chat sample: id, messages (system/user/assistant turns), optional domain."""

    sample_id: str
    messages: list[dict[str, str]]
    domain: str | None
    where: str  # "file:line" (1-based line for JSONL, row index + 1 for Parquet)


def content_id(messages: list[dict[str, str]]) -> str:
    """Stable id of a conversation: sha256 of its canonical JSON, 20 hex digits."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def parse_record(obj: object, where: str) -> Record:
    """Validate one decoded JSON object / Parquet row."""
    if not isinstance(obj, dict):
        lines = "; one JSON object per line is expected" if isinstance(obj, list) else ""  # a JSON array file
        raise BadRecordError(where, f"expected a JSON object, got {type(obj).__name__}{lines}")
    if "messages" in obj and obj["messages"] is not None:
        if obj.get("prompt") not in (None, "") or obj.get("response") not in (None, ""):  # which is the sample?
            raise BadRecordError(where, "record has both 'messages' and 'prompt'/'response': keep one")
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise BadRecordError(where, "'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise BadRecordError(where, f"messages[{i}] must be {{role: system|user|assistant, content: str}}")
            if m.get("role") not in ROLES:
                got = f"role {one_line(json.dumps(m['role']), 40)}" if "role" in m else "no role"
                raise BadRecordError(where, f"messages[{i}] has {got}: expected system, user or assistant")
            messages.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in obj or "response" in obj:
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise BadRecordError(where, "'prompt' and 'response' must both be strings")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise BadRecordError(where, "record has neither 'messages' nor 'prompt'/'response'")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecordError(where, "conversation has no non-empty assistant turn")
    domain = obj.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise BadRecordError(where, "'domain' must be a string")
    if domain == "":  # --only-domain "" is refused, so such records could never be selected
        raise BadRecordError(where, "'domain' must not be empty (leave it out for no domain)")
    sid = obj.get("id")
    if sid is not None and (not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == ""):
        raise BadRecordError(where, "'id' must be a non-empty string or integer")
    for text in (*(m["content"] for m in messages), domain or "", str(sid or "")):
        try:
            text.encode()
        except UnicodeEncodeError:  # JSON may escape lone surrogates ("\ud800"); UTF-8 cannot hold them
            raise BadRecordError(where, "text is not valid Unicode (a lone surrogate)") from None
    return Record(content_id(messages) if sid is None else str(sid), messages, domain, where)


COMPRESSED = (".gz", ".bz2", ".xz", ".zst")  # JSON lines compressed whole, by fsspec's codecs


def _open(path: str, mode: str = "rb", *, decompress: bool = True):
    import fsspec

    from teacher_cache.storage import client_options

    compression = "infer" if decompress and path.endswith(COMPRESSED) else None
    return fsspec.open(path, mode, compression=compression, **client_options(path)).open()


def _lines(path: str) -> Iterator[bytes]:
    """A JSON lines file's lines; a compressed one that cannot be decompressed is one DataFileError."""
    try:
        with _open(path) as f:
            yield from io.BufferedReader(f) if path.endswith(".zst") else f  # zstd's reader has no lines
    except (OSError, EOFError, ValueError) as e:  # BadGzipFile, a truncated stream, lzma/zstd errors
        if not path.endswith(COMPRESSED):
            raise
        raise DataFileError(f"{path}: cannot decompress it ({one_line(e, 200)})") from None


@contextlib.contextmanager
def _parquet_errors(path: str) -> Iterator[None]:
    """Arrow's errors on a file that is not Parquet, or is truncated or damaged, as one
    DataFileError naming it."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        raise DataFileError(f"{path}: not a readable Parquet file ({one_line(e, 200)})") from None


def _read_parquet(path: str, read: Callable[[Any], Any]):
    """read(file) on a Parquet file (pq.read_metadata); errors as `_parquet_errors`."""
    with _open(path) as f, _parquet_errors(path):
        return read(f)


PARQUET_BATCH = 1024  # rows decoded at a time: a whole file as Python objects took ~7x its text in memory


def _parquet_rows(path: str) -> Iterator[tuple[object, str]]:
    """A Parquet file's rows (and "file:row"), decoded a batch at a time, not the whole table at
    once; a file that is not Parquet, or is damaged, is one DataFileError naming it."""
    import pyarrow.parquet as pq

    i = 0
    with _open(path) as f, _parquet_errors(path):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH):
            for row in batch.to_pylist():
                i += 1
                yield row, f"{path}:{i}"


def _raw_rows(path: str) -> Iterator[tuple[object, str]]:
    """(decoded row or BadRecordError, where) for every line/row of one file."""
    name = _format_name(path)
    if name.endswith(".parquet"):
        yield from _parquet_rows(path)
    elif name.endswith((".jsonl", ".json")):
        for lineno, raw in enumerate(_lines(path), start=1):
            line = raw.strip().removeprefix(b"\xef\xbb\xbf" if lineno == 1 else b"")  # UTF-8 byte-order mark
            if not line:
                continue
            where = f"{path}:{lineno}"
            try:  # UTF-8 only (json.loads would take UTF-16/32 bytes too, and fail obscurely on them)
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                why = f"not UTF-8 text (byte {e.start} of the line is {line[e.start : e.start + 1]!r})"
                yield BadRecordError(where, f"{why}; JSON lines must be UTF-8"), where
                continue
            try:
                yield parse_json(text), where
            except ValueError as e:  # JSONDecodeError, nested too deeply
                hint = "; one JSON object per line is expected (JSON lines)" if text in ("[", "{") else ""
                yield BadRecordError(where, f"invalid JSON ({e.__class__.__name__}: {e}){hint}"), where
    else:
        raise DataFileError(
            f"{path}: unknown data format (expected .jsonl, .json or .parquet; JSON lines may be "
            f"compressed: {', '.join(COMPRESSED)})"
        )


def _format_name(path: str) -> str:
    """The file's name without a compression suffix (which only JSON lines may have)."""
    name = path.rsplit("/", 1)[-1]
    for ext in COMPRESSED:
        if name.endswith(ext) and name[: -len(ext)].endswith((".jsonl", ".json")):
            return name[: -len(ext)]
    return name


def check_data_file(path: str) -> None:
    """Fail early, in one line, on a file that does not exist, is a directory, or is a Parquet
    file whose footer cannot be read."""
    import fsspec

    from teacher_cache.storage import Location, StorageError, client_options, is_http

    try:
        if is_http(path):  # fsspec's http exists() says False for a dead server
            parent, name = path.rsplit("/", 1)
            found, folder = Location(parent).exists(name), False
        else:
            fs, p = fsspec.core.url_to_fs(path, **client_options(path))  # no glob expansion: a name may hold '*'
            found = fs.exists(p)
            folder = found and fs.isdir(p)
    except StorageError as e:  # a web server that does not answer: the message names the file
        raise DataFileError(str(e)) from None
    except Exception as e:  # a missing package (s3:// without the extra), credentials, network
        raise DataFileError(f"{path}: cannot reach it ({one_line(e)})") from None
    if not found:
        raise DataFileError(f"data file not found: {path}")
    if folder:
        raise DataFileError(f"{path} is a directory: --data takes JSONL or Parquet files (repeat --data for several)")
    if path.rsplit("/", 1)[-1].endswith(".parquet"):
        import pyarrow.parquet as pq

        _read_parquet(path, pq.read_metadata)


def iter_records(paths: list[str], *, skip_bad: bool, bad: list[str] | None = None) -> Iterator[Record]:
    """All records of all files in order; with skip_bad, bad ones are appended to `bad`.
    A file with no record at all is an error; one whose records were all skipped is not."""
    for path in paths:
        check_data_file(path)
        n = skipped = 0
        for row, where in _raw_rows(path):
            try:
                if isinstance(row, BadRecordError):
                    raise row
                rec = parse_record(row, where)
            except BadRecordError as e:
                if not skip_bad:
                    raise BadRecordError(e.where, f"{e.why}; rerun with --skip-bad to skip such records") from None
                skipped += 1
                if bad is not None:
                    bad.append(str(e))
                continue
            n += 1
            yield rec
        if n == 0 and not skipped:  # this file's skips, not earlier files' (`bad` holds those too)
            raise DataFileError(f"{path}: no records (empty file)")


def file_sha256(path: str) -> str:
    """sha256 of a data file (local or fsspec URL) as stored (a compressed one's compressed bytes, as
    `sha256sum` gives it), as the manifest records it."""
    h = hashlib.sha256()
    with _open(path, decompress=False) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
