"""Coverage-guided fuzzing (atheris) of the parsers that read untrusted bytes; run by hand.

    pip install atheris
    python fuzz/fuzz_parsers.py -atheris_runs=200000

Each input is split into an SSE stream (fed in two pieces), a response body and header value
for classify/decoding, and a JSONL line. Anything but a corral error (or None) is a bug, and
atheris stops with the input that caused it.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from corral.batch._items import parse_line
    from corral.core import Headers, Response, errors
    from corral.core._classify import classify, parse_duration, parse_retry_after
    from corral.core._sse import SSEParser
    from corral.core._wire import ChatStreamDecoder, UsageWatcher, decode_chat, decode_embeddings


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    status = fdp.ConsumeIntInRange(100, 599)
    header = fdp.ConsumeUnicodeNoSurrogates(40)
    cut = fdp.ConsumeIntInRange(0, 64)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())

    parser = SSEParser()
    assert parser.feed(raw[:cut]) + parser.feed(raw[cut:]) + parser.close() is not None
    headers = Headers({"retry-after": header, "x-ratelimit-reset-tokens": header})
    parse_duration(header)
    parse_retry_after(headers, now_wall=0.0)
    classify(status, headers, raw)
    for decode in (decode_chat, decode_embeddings):
        with contextlib.suppress(errors.CorralError):
            decode(Response(status, headers, raw))
    decoder = ChatStreamDecoder()
    try:
        decoder.feed(raw)
        decoder.close()
    except errors.CorralError:
        pass
    UsageWatcher().feed(raw)
    parse_line(1, raw)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
