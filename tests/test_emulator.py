"""The emulator's behaviour as a provider: auth, limits, context window, faults, counters."""

from __future__ import annotations

import inspect
import json
import math

import pytest

from corral.core import Headers, Response, decode_chat, decode_embeddings, errors, parse_retry_after
from corral.core._classify import parse_rate_limit_headers
from corral.testing.emulator import DEFAULT_MODELS, Emulator, EmulatorConfig, Fault

KEY = {"authorization": "Bearer sk-test"}


def call(
    emu: Emulator, body: dict[str, object], now: float = 0.0, path: str = "/v1/chat/completions"
) -> Response:
    plan = emu.handle(now, "POST", path, KEY, json.dumps(body).encode())
    return Response(plan.status, Headers(plan.headers), plan.body)


def chat_body(text: str = "hi", **extra: object) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def test_auth_is_checked() -> None:
    emu = Emulator(EmulatorConfig(api_keys=frozenset({"sk-good"})))
    plan = emu.handle(0, "POST", "/v1/chat/completions", KEY, b"{}")
    assert plan.status == 401
    plan = emu.handle(0, "POST", "/v1/chat/completions", {}, b"{}")
    assert plan.status == 401


def test_rpm_limit_gives_429_with_retry_after_and_headers() -> None:
    emu = Emulator(EmulatorConfig(rpm=3))
    assert [call(emu, chat_body(), now=t).status for t in (0, 1, 2)] == [200] * 3
    denied = call(emu, chat_body(), now=10)
    with pytest.raises(errors.RateLimitError) as info:
        decode_chat(denied)
    assert info.value.retry_after == pytest.approx(50.0)
    assert parse_retry_after(denied.headers) == pytest.approx(50.0)
    limits = parse_rate_limit_headers(denied.headers)
    assert limits.limit_requests == 3 and limits.remaining_requests == 0
    assert call(emu, chat_body(), now=60.001).status == 200
    assert emu.counts["rate_limited"] == 1 and emu.counts["ok"] == 4


def test_tpm_counts_prompt_and_completion_tokens() -> None:
    emu = Emulator(EmulatorConfig(tpm=100))
    first = decode_chat(call(emu, chat_body("word " * 30)))
    assert first.usage is not None and first.usage.total_tokens <= 100
    assert call(emu, chat_body("word " * 30), now=1).status == 429


def test_context_window_exceeded_names_the_numbers() -> None:
    emu = Emulator(EmulatorConfig(models=frozenset({"small-model"})))
    reply = call(emu, {**chat_body("x " * 10_000), "model": "small-model", "max_tokens": 100})
    with pytest.raises(errors.ContextLengthExceeded) as info:
        decode_chat(reply)
    assert info.value.max_context == 4096 and info.value.requested is not None
    assert info.value.requested > 4096


def test_max_tokens_cuts_the_reply() -> None:
    result = decode_chat(call(Emulator(), chat_body(max_tokens=2)))
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 2


def test_faults_are_seeded_and_counted() -> None:
    config = EmulatorConfig(faults={Fault.SERVER_ERROR: 0.2, Fault.UNAVAILABLE: 0.1}, seed=7)
    runs = []
    for _ in range(2):
        emu = Emulator(config)
        runs.append([call(emu, chat_body()).status for _ in range(500)])
    assert runs[0] == runs[1]
    assert math.isclose(runs[0].count(500) / 500, 0.2, abs_tol=0.06)
    assert math.isclose(runs[0].count(503) / 500, 0.1, abs_tol=0.05)
    with pytest.raises(ValueError, match="add up"):
        Emulator(EmulatorConfig(faults={Fault.HANG: 0.7, Fault.RESET: 0.6}))


def test_embeddings_are_deterministic_and_similar_texts_are_close() -> None:
    emu = Emulator()

    def cos(x: tuple[float, ...], y: tuple[float, ...]) -> float:
        return sum(i * j for i, j in zip(x, y, strict=True))

    def vec(text: str) -> tuple[float, ...]:
        reply = call(emu, {"model": "text-embedding-3-small", "input": text}, path="/v1/embeddings")
        return decode_embeddings(reply).vectors[0]

    a, b, c = (
        vec("the cat sat on the mat today"),
        vec("the cat sat on the mat"),
        vec("stock prices fell"),
    )
    assert a == vec("the cat sat on the mat today")
    assert cos(a, b) > 0.9 > cos(a, c)


def test_bad_bodies_get_400() -> None:
    emu = Emulator()
    assert emu.handle(0, "POST", "/v1/chat/completions", KEY, b"{nope").status == 400
    assert call(emu, {"messages": []}).status == 400


def test_unknown_routes_get_404_naming_the_real_ones() -> None:
    emu = Emulator()
    for method, path in [
        ("POST", "/v1/chat/completion"),
        ("POST", "/chat/completions"),
        ("POST", "/v2/chat/completions"),
        ("POST", "/openai/deployments/x/chat/completions"),
        ("GET", "/v1/chat/completions"),
        ("DELETE", "/v1/models"),
    ]:
        plan = emu.handle(0, method, path, KEY, json.dumps(chat_body()).encode())
        assert plan.status == 404, path
        error = json.loads(plan.body)["error"]
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert f"Invalid URL ({method} {path})" in error["message"]
        for route in ("POST /v1/chat/completions", "POST /v1/embeddings", "GET /v1/models"):
            assert route in error["message"]
    assert call(emu, chat_body(), path="/v1/chat/completions?x=1").status == 200


def test_unknown_model_is_model_not_found_in_openais_shape() -> None:
    emu = Emulator()
    plan = emu.handle(0, "POST", "/v1/chat/completions", KEY, json.dumps(chat_body()).encode())
    assert plan.status == 200
    wrong_models: list[tuple[str, dict[str, object]]] = [
        ("/v1/chat/completions", chat_body(model="gpt-4o-mnii")),
        ("/v1/embeddings", {"model": "text-embeding-3-small", "input": "x"}),
    ]
    for path, body in wrong_models:
        reply = call(emu, body, path=path)
        assert reply.status == 404
        model = body["model"]
        assert json.loads(reply.body) == {
            "error": {
                "message": f"The model `{model}` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        }
        with pytest.raises(errors.NotFoundError, match=f"`{model}` does not exist"):
            decode_chat(reply)


def test_default_models_are_real_ones_and_include_the_demos() -> None:
    from corral._demo import write_reviews

    assert {"gpt-4o-mini", "gpt-4.1-mini", "text-embedding-3-small"} <= DEFAULT_MODELS
    assert "m" not in DEFAULT_MODELS and "small-model" not in DEFAULT_MODELS
    assert "model" in inspect.signature(write_reviews).parameters
    demo_model = inspect.signature(write_reviews).parameters["model"].default
    assert demo_model in DEFAULT_MODELS
    listed = json.loads(Emulator().handle(0, "GET", "/v1/models", KEY, b"").body)
    assert {m["id"] for m in listed["data"]} == DEFAULT_MODELS


def test_models_is_configurable_and_any_model_accepts_all() -> None:
    emu = Emulator(EmulatorConfig(models=frozenset({"mine"})))
    assert call(emu, chat_body(model="mine")).status == 200
    assert call(emu, chat_body(model="gpt-4o-mini")).status == 404
    anything = Emulator(EmulatorConfig(any_model=True))
    assert call(anything, chat_body(model="m")).status == 200
    assert call(anything, {"model": "e", "input": "x"}, path="/v1/embeddings").status == 200


def _chat_body(content: str, max_tokens: int | None) -> bytes:
    body: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


def test_reserved_counting_charges_the_estimate_plus_max_tokens_and_keeps_it() -> None:
    """``count="reserved"``: prompt (characters / 4) + max_tokens, not the usage."""
    from corral.testing.emulator import Emulator, EmulatorConfig

    auth = {"authorization": "Bearer sk-test-key-1234"}
    prompt = "x" * 400  # 100 tokens by the provider's estimate (+3 per message)
    reserved = Emulator(EmulatorConfig(tpm=1000, count="reserved", any_model=True))
    usage = Emulator(EmulatorConfig(tpm=1000, count="usage", any_model=True))
    admitted = {"reserved": 0, "usage": 0}
    for name, emu in (("reserved", reserved), ("usage", usage)):
        for _ in range(20):
            plan = emu.handle(0.0, "POST", "/v1/chat/completions", auth, _chat_body(prompt, 397))
            admitted[name] += plan.status == 200
    assert admitted["reserved"] == 2  # 1000 // (103 + 397): unused max_tokens stay charged
    assert admitted["usage"] > 2


def test_injected_faults_do_not_use_quota_unless_asked() -> None:
    from corral.testing.emulator import Emulator, EmulatorConfig, Fault

    auth = {"authorization": "Bearer sk-test-key-1234"}
    for use_quota, expected in ((False, 0), (True, 5)):
        emu = Emulator(
            EmulatorConfig(
                rpm=5, faults={Fault.SERVER_ERROR: 1.0}, faults_use_quota=use_quota, any_model=True
            )
        )
        for _ in range(5):
            assert (
                emu.handle(0.0, "POST", "/v1/chat/completions", auth, _chat_body("hi", 5)).status
                == 500
            )
        assert len(emu.quota._log) == expected
