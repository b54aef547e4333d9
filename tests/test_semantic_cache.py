"""The semantic cache, against the emulator's bag-of-words embeddings."""

from __future__ import annotations

import pytest

from corral._client import Client, default_middleware
from corral.middleware._semantic_cache import SemanticCache, cosine
from corral.testing.server import RunningEmulator
from tests.support import CANARY_KEY

pytestmark = pytest.mark.anyio


def ask(text: str, system: str = "be brief") -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


async def test_similar_questions_share_an_answer_within_a_scope(emulator: RunningEmulator) -> None:
    semantic = SemanticCache(threshold=0.9)
    stack = [semantic, *default_middleware()]
    async with Client(emulator.base_url, CANARY_KEY, middleware=stack, model="gpt-4o-mini") as c:
        first = await c.chat(ask("the cat sat on the mat today"))
        near = await c.chat(ask("the cat sat on the mat"))
        other = await c.chat(ask("stock prices fell sharply"))
        other_scope = await c.chat(ask("the cat sat on the mat", system="answer in French"))
        other_model = await c.chat(ask("the cat sat on the mat"), model="gpt-4.1-mini")
    assert near.text == first.text and semantic.hits == 1
    assert other.text != first.text
    assert semantic.misses == 4  # first, other, other_scope, other_model
    del other_scope, other_model


def test_cosine() -> None:
    assert (
        cosine([1, 0], [1, 0]) == 1 and cosine([1, 0], [0, 1]) == 0 and cosine([0, 0], [1, 1]) == 0
    )
