"""The one config reader, driven by the settings fields: keys, kinds, defaults and rules.

Every key of the file is a ``setting()`` field of ``watcher.settings``; these tests walk all
of those fields, so a key added there is covered here without a new test. The cross-field
rules are pure functions of the config read and the mappings written, tested as such.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from watcher.config import (
    CROSS_FIELD_RULES,
    SECTION_KEYS,
    SECTIONS,
    TOP_LEVEL_KEYS,
    Written,
    _ConfigReader,
    api_listener_needs_a_pool,
    api_listener_needs_authentication,
    client_certificates_need_tls,
    config_keys,
    load_config,
    tls_needs_a_certificate_and_its_key,
)
from watcher.core.errors import ConfigError, Problem
from watcher.core.yamlsource import LineMap, parse_yaml
from watcher.settings import KINDS, ApiSettings, Config, setting

SETTINGS = [pytest.param(name, f, id=f"{name}.{f.name}")
            for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def problems_of(tmp_path: Path, text: str) -> tuple[Path, list[Problem]]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    return path, caught.value.problems


def written(text: str) -> Written:
    top = parse_yaml(text, "config.yaml").value
    assert isinstance(top, LineMap)
    return {"": top, **{name: top.get(name) or LineMap(0) for name in SECTIONS}}


# --- keys and kinds come from the fields ------------------------------------------------------


@pytest.mark.parametrize(("section", "f"), SETTINGS)
def test_every_setting_is_a_key_with_a_known_kind_and_a_doc(
        section: str, f: dataclasses.Field[Any]) -> None:
    assert f.metadata["kind"] in KINDS
    assert f.metadata["doc"]
    assert f.name in SECTION_KEYS[section]


def test_the_top_level_keys_are_the_sections_and_the_top_level_settings() -> None:
    assert set(TOP_LEVEL_KEYS) == {*SECTIONS, "reconcile_interval"}


def test_a_secret_is_also_allowed_as_a_file_and_never_shown_in_repr() -> None:
    assert config_keys(SECTIONS["amqp"])[0] == "url"
    assert "url_file" in config_keys(SECTIONS["amqp"])
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.repr is (f.metadata.get("kind") != "secret"), f"{name}.{f.name}"


def test_the_reader_has_one_reader_per_kind() -> None:
    assert set(_ConfigReader(Path("config.yaml"), {}).kinds) == set(KINDS)


def test_a_setting_of_an_unknown_kind_is_refused_where_it_is_declared() -> None:
    with pytest.raises(ValueError, match="unknown kind of setting 'duration'"):
        setting(5, "duration", doc="never read")


# --- the same reading for every key -----------------------------------------------------------


@pytest.mark.parametrize(("section", "f"), SETTINGS)
def test_a_key_no_field_declares_is_refused_at_its_line_naming_the_allowed_keys(
        tmp_path: Path, section: str, f: dataclasses.Field[Any]) -> None:
    path, problems = problems_of(tmp_path, f"{section}:\n  {f.name}_typo: 1\n")
    assert [(p.file, p.line) for p in problems] == [(str(path), 2)]
    allowed = ", ".join(sorted(SECTION_KEYS[section]))
    assert problems[0].message == (
        f"{section}: unknown key '{f.name}_typo'; allowed keys: {allowed}")


@pytest.mark.parametrize(("section", "f"), SETTINGS)
def test_a_value_of_the_wrong_kind_is_refused_at_its_line_naming_the_key(
        tmp_path: Path, section: str, f: dataclasses.Field[Any]) -> None:
    path, problems = problems_of(tmp_path, f"# one mistake\n{section}:\n  {f.name}:\n    a: 1\n")
    # Other problems are those of cross-field rules, which see that the key is set.
    own = [p for p in problems if p.message.startswith(f"{section}.{f.name}: expected ")]
    assert [(p.file, p.line) for p in own] == [(str(path), 3)]


def test_a_top_level_value_of_the_wrong_kind_is_refused_at_its_line(tmp_path: Path) -> None:
    path, problems = problems_of(tmp_path, "log: {}\nreconcile_interval: [60]\n")
    assert [str(p) for p in problems] == [
        f"{path}:2: reconcile_interval: expected a number larger than 0, got a list"]


@pytest.mark.parametrize(("section", "f"), SETTINGS)
def test_a_key_left_out_takes_the_default_of_its_field(
        tmp_path: Path, section: str, f: dataclasses.Field[Any]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"{section}: {{}}\n")
    assert getattr(getattr(load_config(path, {}), section), f.name) == f.default


def test_a_valid_value_of_each_kind_is_read_into_its_type(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem\n")
    path = tmp_path / "config.yaml"
    path.write_text("cache: {dir: c, max_size: 1KiB, stale_sidecar_hold: 0}\n"
                    "amqp: {exchange_type: topic, prefetch: 7}\nreconcile_interval: 2\n"
                    "volumes: {lvm_vgs: [vg0]}\ntracing: {otlp_endpoint: 'https://t:4318'}\n"
                    "api: {client_ca: ca.pem, tls_cert: ca.pem, tls_key: ca.pem}\n")
    config = load_config(path, {})
    assert (config.cache.dir, config.cache.max_size, config.cache.stale_sidecar_hold) == (
        tmp_path / "c", 1024, 0.0)
    assert (config.amqp.exchange_type, config.amqp.prefetch) == ("topic", 7)
    assert (config.reconcile_interval, config.volumes.lvm_vgs) == (2.0, ("vg0",))
    assert (config.tracing.otlp_endpoint, config.api.client_ca) == (
        "https://t:4318", tmp_path / "ca.pem")


# --- cross-field rules --------------------------------------------------------------------


def test_every_cross_field_rule_is_named_and_says_why() -> None:
    assert len({rule.__name__ for rule in CROSS_FIELD_RULES}) == len(CROSS_FIELD_RULES)
    assert all(rule.__doc__ for rule in CROSS_FIELD_RULES)


LISTENING = Config(api=ApiSettings(listen=":8080"))


@pytest.mark.parametrize(("rule", "config", "text", "expected"), [
    pytest.param(api_listener_needs_a_pool, LISTENING, "api:\n  listen: ':8080'\n",
                 [(2, "api.pool: required when api.listen is set")], id="no-pool"),
    pytest.param(api_listener_needs_a_pool, LISTENING, "api:\n  listen: ':8080'\n  pool: a/b\n",
                 [], id="a-bad-pool-is-its-own-problem"),
    pytest.param(api_listener_needs_a_pool, Config(), "api:\n  listen: '80'\n", [],
                 id="an-invalid-listener-is-its-own-problem"),
    pytest.param(api_listener_needs_authentication, LISTENING,
                 "api:\n  pool: p\n  listen: ':8080'\n",
                 [(3, "api: with listen set, tokens_file or client_ca is required")],
                 id="no-authentication"),
    pytest.param(api_listener_needs_authentication, LISTENING,
                 "api:\n  listen: ':8080'\n  client_ca: ca.pem\n", [], id="client-certificates"),
    pytest.param(tls_needs_a_certificate_and_its_key, Config(), "api:\n  tls_key: k\n",
                 [(2, "api.tls_key: needs api.tls_cert as well")], id="key-alone"),
    pytest.param(tls_needs_a_certificate_and_its_key, Config(),
                 "api:\n  tls_key: k\n  tls_cert: c\n", [], id="both"),
    pytest.param(client_certificates_need_tls, Config(), "api: {tls_key: k, client_ca: a}\n",
                 [(1, "api.client_ca: needs api.tls_cert and api.tls_key")], id="mtls-alone"),
])
def test_a_cross_field_rule_fires_at_the_line_of_the_key_it_is_about(
        rule: Any, config: Config, text: str, expected: list[tuple[int, str]]) -> None:
    found = list(rule(config, written(text)))
    assert [line for line, _ in found] == [line for line, _ in expected]
    for (_, message), (_, words) in zip(found, expected, strict=True):
        assert message.startswith(words)


def test_the_reader_runs_the_rules_after_the_fields_and_reports_at_file_and_line(
        tmp_path: Path) -> None:
    path, problems = problems_of(tmp_path, "api:\n  pool: p\n  listen: ':8080'\n  colour: x\n")
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [(3, "api"), (4, "api")]
    assert problems[0].message.startswith("api: with listen set, tokens_file or client_ca")
    assert all(p.file == str(path) for p in problems)
