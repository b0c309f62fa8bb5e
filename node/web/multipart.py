"""multipart/related bodies, both ways: a streaming reader that spools each part to a file
as it arrives and hands out whole parts (STOW-RS: memory stays flat whatever the body's
size), and the writer of WADO-RS responses."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, MultipartState


class BadBody(ValueError):
    """The body is not a well-formed multipart/related message (HTTP 400)."""


@dataclass
class Part:
    """One part of a request, spooled to `file` (`size` bytes); `oversize` when it grew past
    the limit (its bytes dropped), `spool_error` when the file could not take it."""

    content_type: str | None
    file: BinaryIO
    size: int = 0
    oversize: bool = False
    spool_error: str | None = None


def media_type(header: str | None) -> tuple[str, dict[str, str]]:
    """A Content-Type or Accept entry: the media type (lower case) and its parameters."""
    message = Message()
    message["content-type"] = header or ""
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


def accepted(header: str | None, default: str) -> list[tuple[str, dict[str, str]]]:
    """The entries of an Accept header, in order, each as `media_type` reads it; `default`
    alone when the header names none."""
    entries = [entry.strip() for entry in (header or "").split(",") if entry.strip()]
    return [media_type(entry) for entry in entries or [default]]


class PartReader:
    """Feed the body in chunks; take the parts completed so far after each feed.

    Each part goes to a file `spool` opens (closing it is the taker's); no more than
    `max_part_bytes` of it.
    """

    def __init__(self, boundary: str, max_part_bytes: int, spool: Callable[[], BinaryIO]) -> None:
        self._max = max_part_bytes
        self._spool = spool
        self._completed: list[Part] = []
        self._current: Part | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._parser = MultipartParser(
            boundary.encode("latin-1"),
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> list[Part]:
        try:
            self._parser.write(chunk)
        except Exception as exc:  # python-multipart raises its own errors on bad framing
            raise BadBody(f"malformed multipart body: {exc}") from exc
        completed, self._completed = self._completed, []
        return completed

    def finish(self) -> None:
        """BadBody unless the closing boundary arrived."""
        if self._parser.state != MultipartState.END:
            raise BadBody("the body ends before the closing multipart boundary")

    def close(self) -> None:
        """Close the spools of the parts not handed out (a body cut short)."""
        for part in (*self._completed, self._current):
            if part is not None:
                part.file.close()
        self._completed, self._current = [], None

    def _begin(self) -> None:
        self._headers = {}
        self._current = Part(None, self._spool())

    def _header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self._headers[name] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        assert self._current is not None
        self._current.content_type = self._headers.get("content-type")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._current
        assert part is not None
        if part.oversize or part.spool_error:
            return
        if part.size + end - start > self._max:
            part.oversize = True
            part.file.truncate(0)
            return
        try:
            part.file.write(data[start:end])
        except OSError as exc:  # the disk is full: this part fails, the body goes on
            part.spool_error = exc.strerror or str(exc)
            part.file.truncate(0)
            return
        part.size += end - start

    def _end(self) -> None:
        assert self._current is not None
        self._completed.append(self._current)
        self._current = None


@dataclass(frozen=True)
class MultipartWriter:
    """Frames parts of a multipart/related response."""

    part_type: str
    boundary: str = field(default_factory=lambda: uuid.uuid4().hex)

    def content_type(self) -> str:
        main = self.part_type.split(";")[0]
        return f'multipart/related; type="{main}"; boundary={self.boundary}'

    def frame(self, parts: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[bytes]:
        """Each part (its content type, its bytes in chunks) as one piece with its framing
        (a piece is a hop to the server's thread pool: few, large ones); then the end."""
        for part_type, chunks in parts:
            head = f"--{self.boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
            yield b"".join((head, *chunks, b"\r\n"))
        yield f"--{self.boundary}--\r\n".encode()
