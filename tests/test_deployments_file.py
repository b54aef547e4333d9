"""Deployments as a TOML file (issue 16 items 3 and 5): read into typed deployments with dated
prices, keys only by environment variable, every mistake reported as FILE:LINE."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from corral._deployments import load_router, read_deployments
from corral.core._errors import InvalidInput
from corral.middleware._metrics import Price
from corral.middleware._prices import DEFAULT_PRICE_TABLE

EXAMPLE = """\
[router]
strategy = "priority"
cooldown = 2.5

[[deployment]]
name = "relay-a"
base_url = "http://127.0.0.1:8001/v1"
api_key_env = "RELAY_A_KEY"
rpm = 600
tpm = 100000
priority = 1
[deployment.prices]   # USD per million tokens
as_of = 2026-11-01
input = 0.38
output = 0.38
cached_input = 0.19

[[deployment]]
name = "pool"
base_url = "https://pool.example/v1"
api_key_env = ["POOL_1", "POOL_2"]
shared_quota = true
priority = 2
[deployment.models]
"gpt-4o-mini" = "gpt-4o-mini-2024-07-18"
[deployment.prices."gpt-4o-mini-2024-07-18"]
input = 0.15
output = 0.60
reasoning = 0.60
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RELAY_A_KEY", "POOL_1", "POOL_2"):
        monkeypatch.setenv(name, f"sk-{name}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    return path


def test_the_example_reads_into_deployments_with_dated_prices(tmp_path: Path, env: None) -> None:
    file = read_deployments(write(tmp_path, EXAMPLE))
    a, pool = file.deployments
    assert (a.name, a.base_url, a.api_key_env, a.rpm, a.tpm, a.priority) == (
        "relay-a",
        "http://127.0.0.1:8001/v1",
        ("RELAY_A_KEY",),
        600,
        100000,
        1,
    )
    assert a.prices.as_of == datetime.date(2026, 11, 1)
    assert a.price_for("anything") == Price(0.38, 0.38, cached_input=0.19)
    assert pool.api_key_env == ("POOL_1", "POOL_2") and pool.shared_quota
    assert pool.model_for("gpt-4o-mini") == "gpt-4o-mini-2024-07-18"
    assert pool.price_for("gpt-4o-mini") == Price(0.15, 0.60, reasoning=0.60)
    assert pool.prices.as_of is None
    assert a.where == f"{tmp_path / 'deployments.toml'}:5"
    assert file.router == {"strategy": "priority", "cooldown": 2.5}


def test_without_prices_a_deployment_uses_the_dated_default_list(tmp_path: Path, env: None) -> None:
    text = '[[deployment]]\nname = "a"\nbase_url = "http://a/v1"\napi_key_env = "RELAY_A_KEY"\n'
    (a,) = read_deployments(write(tmp_path, text)).deployments
    assert a.prices is DEFAULT_PRICE_TABLE
    assert a.price_for("gpt-4o-mini") == Price(0.15, 0.60)


def test_load_router_builds_the_router_with_its_settings(tmp_path: Path, env: None) -> None:
    router = load_router(write(tmp_path, EXAMPLE), max_attempts=3)
    assert router.config.cooldown == 2.5 and router.config.retry.max_attempts == 3
    assert router.secrets == ("sk-POOL_1", "sk-POOL_2", "sk-RELAY_A_KEY")
    assert [lane.name for lane in router.lanes_for("gpt-4o-mini")] == [
        "relay-a",
        "pool#0",
        "pool#1",
    ]


def test_every_problem_is_reported_at_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MISSING_KEY", raising=False)
    text = """\
[[deployment]]
name = "a"
base_url = "ftp://a"
api_key_env = "MISSING_KEY"
rmp = 600
tpm = "lots"

[[deployment]]
name = "b"
base_url = "http://b/v1"
api_key = "sk-inline-secret"
api_key_env = "MISSING_KEY"
[deployment.prices]
input = -1
"""
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as caught:
        read_deployments(path)
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}:5: deployment 'a': unknown key 'rmp' (did you mean 'rpm'?)",
        f"{path}:3: deployment 'a': base_url must be an http:// or https:// URL, got 'ftp://a'",
        f"{path}:4: deployment 'a': the environment variable MISSING_KEY is not set; "
        "e.g. `export MISSING_KEY=sk-...`",
        f"{path}:6: deployment 'a': tpm must be an integer >= 1, got 'lots'",
        f"{path}:11: deployment 'b': keys are named by environment variable only; write "
        'api_key_env = "NAME" and export NAME (a deployments file never holds a key)',
        f"{path}:12: deployment 'b': the environment variable MISSING_KEY is not set; "
        "e.g. `export MISSING_KEY=sk-...`",
        f"{path}:14: deployment 'b': prices.input must be a number >= 0 (USD per million tokens)"
        ", got -1",
        f"{path}:13: deployment 'b': prices need output (USD per million tokens)",
    ]
    assert "sk-inline-secret" not in str(caught.value)


def test_serving_needs_no_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_A_KEY", raising=False)
    monkeypatch.delenv("POOL_1", raising=False)
    file = read_deployments(write(tmp_path, EXAMPLE), check_env=False)
    assert len(file.deployments) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[deployment]]\nname = "a"\nrpm = = 3\n', ":3: not valid TOML: Invalid value"),
        ("[router]\nstrategy = 'fastest'\n", ":2: strategy must be one of priority, weighted"),
        ("", ":1: no [[deployment]] tables"),
        (
            '[[deployment]]\nname = "a"\nbase_url = "http://a"\napi_key_env = "RELAY_A_KEY"\n'
            '[[deployment]]\nname = "a"\nbase_url = "http://b"\napi_key_env = "RELAY_A_KEY"\n',
            ":6: a second deployment named 'a'",
        ),
        (
            '[[deployment]]\nname = "a"\nbase_url = "http://a"\napi_key_env = "RELAY_A_KEY"\n'
            "[deployment.breaker]\nthreshold = 3\n",
            ":5: deployment 'a': BreakerConfig.threshold must be a number in (0, 1]",
        ),
        (
            '[[deployment]]\nname = "a"\nbase_url = "http://a"\napi_key_env = "RELAY_A_KEY"\n'
            "[deployment.prices]\nas_of = 'last week'\ninput = 1\noutput = 1\n",
            ":6: deployment 'a': prices.as_of must be a date",
        ),
    ],
)
def test_mistakes_name_their_line(tmp_path: Path, env: None, text: str, expected: str) -> None:
    with pytest.raises(InvalidInput, match=None) as caught:
        read_deployments(write(tmp_path, text))
    assert expected in str(caught.value)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read the deployments file"):
        read_deployments(tmp_path / "nope.toml")
