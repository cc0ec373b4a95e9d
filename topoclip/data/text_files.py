"""Text in a declared encoding, with errors that say where: file and line (a CSV) or shard
and key (a webdataset sample), never a bare ``'utf-8' codec can't decode byte 0xe9``."""

from __future__ import annotations

import codecs
import csv
import os
from collections.abc import Iterator

__all__ = ["check_encoding", "csv_rows", "decode_caption", "read_lines", "read_text"]


def check_encoding(encoding: str, field: str) -> None:
    """A ValueError naming ``field`` unless Python knows ``encoding``."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"{field}: unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None


def _explain(err: UnicodeDecodeError, encoding: str) -> str:
    byte = err.object[err.start:err.start + 1].hex()
    return f"not valid {encoding} (byte 0x{byte} at column {err.start + 1}); give the file's encoding"


def decode_caption(raw: bytes, where: str, encoding: str = "utf-8") -> str:
    """``raw`` decoded; ValueError naming ``where`` when it is not in ``encoding``."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: caption {_explain(err, encoding)}") from None


def read_lines(path: str | os.PathLike, encoding: str = "utf-8") -> tuple[list[str], dict[int, str]]:
    """The lines of a text file (line ends kept, for ``csv``) and ``{line number: problem}`` for
    the lines that are not in ``encoding``; those come back decoded with replacement characters,
    so that line numbers stay right and the caller decides to skip them or to fail.

    Decoding line by line is safe for every ASCII-compatible encoding (utf-8, latin-1, cp1252):
    a newline byte never occurs inside another character.
    """
    lines, bad = [], {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                lines.append(raw.decode(encoding))
            except UnicodeDecodeError as err:
                bad[number] = _explain(err, encoding)
                lines.append(raw.decode(encoding, errors="replace"))
    return lines, bad


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """A whole text file (a JSON split, a class-names list); a ValueError naming the file and
    the line of the first byte that is not in ``encoding``."""
    raw = open(path, "rb").read()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        byte = raw[err.start:err.start + 1].hex()
        raise ValueError(f"{os.fspath(path)}:{line}: not valid {encoding} (byte 0x{byte} at column {column})") from None


def csv_rows(path: str | os.PathLike, sep: str, encoding: str = "utf-8") -> tuple[list[str], Iterator[tuple[int, dict, str | None]]]:
    """``(columns, rows)`` of a CSV/TSV with a header row: each row as ``(line, fields,
    problem)``, ``line`` its last physical line (a quoted field may span several) and
    ``problem`` None, or ``"FILE:LINE: not valid utf-8 (...)"`` when one of its lines is not in
    ``encoding`` (its fields then hold replacement characters: the caller skips the row or
    fails). A header that does not decode is a ValueError."""
    check_encoding(encoding, "encoding")
    source = os.fspath(path)
    lines, undecodable = read_lines(path, encoding)
    if 1 in undecodable:
        raise ValueError(f"{source}:1: the header is {undecodable[1]}")
    reader = csv.DictReader(lines, delimiter=sep)
    columns = list(reader.fieldnames or [])

    def rows() -> Iterator[tuple[int, dict, str | None]]:
        first_line = 2
        for row in reader:
            spanned = range(first_line, reader.line_num + 1)
            first_line = reader.line_num + 1
            problem = next((f"{source}:{n}: {undecodable[n]}" for n in spanned if n in undecodable), None)
            yield reader.line_num, row, problem

    return columns, rows()
