"""The daemon config: defaults, validation at file:line, secrets and the policy directory.

The daemon refuses to start on a bad config and ``check`` prints the same problems, so each
mistake is pinned to its line here. Secrets come from the environment, secret files or
systemd credentials, and must never show up in ``repr()`` or in an error.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from watcher.config import check_all, load_config, load_policy_dir
from watcher.core.errors import ConfigError, Problem
from watcher.settings import AmqpSettings, Config, S3Settings

ACCESS = "AKIA-access-0123"
SECRET = "s3cr3t-value-9876"
AMQP_URL = "amqp://watcher:hunter2-pass@mq.example:5672/vh"


def write(path: Path, text: str) -> Path:
    path.write_text(dedent(text))
    return path


def config_file(tmp_path: Path, text: str) -> Path:
    return write(tmp_path / "config.yaml", text)


def problems_of(path: Path, environ: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ or {})
    return caught.value.problems


# --- valid configs -------------------------------------------------------------------------


def test_an_empty_config_file_gives_every_default(tmp_path: Path) -> None:
    path = config_file(tmp_path, "")
    assert load_config(path, {}) == Config(source=path)


def test_the_documented_config_is_read_in_full(tmp_path: Path) -> None:
    path = config_file(tmp_path, """\
        libvirt:  {uri: "qemu+ssh://host/system"}
        s3:       {endpoint: "https://s3.example:9000", access_key: AK, secret_key: SK,
                   region: eu-west-1}
        amqp:     {url: "amqps://u:p@mq:5671/", exchange: uploads, exchange_type: topic,
                   routing_key: "images.#", queue: q1, prefetch: 4}
        cache:    {dir: /srv/cache, max_size: 20GiB, max_virtual_size: 2TiB,
                   max_concurrent_downloads: 3}
        policies: {dir: /srv/policies}
        http:     {listen: "0.0.0.0:9700"}
        reconcile_interval: 60
        volumes:  {allow: ["/dev/vg0/*", "/dev/mapper/vg1-*"], lvm_vgs: [vg0, vg_data.1]}
        reprovision: {max_concurrent: 5}
        tracing:  {otlp_endpoint: "http://tempo:4318"}
        """)
    config = load_config(path, {})
    assert config.libvirt.uri == "qemu+ssh://host/system"
    assert config.s3 == S3Settings(endpoint="https://s3.example:9000", access_key="AK",
                                   secret_key="SK", region="eu-west-1")
    assert config.s3.secure and config.s3.host == "s3.example:9000"
    assert config.amqp == AmqpSettings(url="amqps://u:p@mq:5671/", exchange="uploads",
                                       exchange_type="topic", routing_key="images.#",
                                       queue="q1", prefetch=4)
    assert (config.cache.dir, config.cache.max_size, config.cache.max_concurrent_downloads) == (
        Path("/srv/cache"), 20 * 1024**3, 3)
    assert config.cache.max_virtual_size == 2 * 1024**4
    assert config.policies.dir == Path("/srv/policies")
    assert config.http.listen == "0.0.0.0:9700"
    assert config.reconcile_interval == 60.0
    assert config.volumes.allow == ("/dev/vg0/*", "/dev/mapper/vg1-*")
    assert config.volumes.lvm_vgs == ("vg0", "vg_data.1")
    assert config.reprovision.max_concurrent == 5
    assert config.tracing.otlp_endpoint == "http://tempo:4318"
    assert config.source == path


def test_images_up_to_4_tib_of_virtual_size_are_accepted_by_default(tmp_path: Path) -> None:
    assert load_config(config_file(tmp_path, ""), {}).cache.max_virtual_size == 4 * 1024**4


def test_relative_directories_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, "cache: {dir: cache}\npolicies: {dir: ../policies.d}\n")
    config = load_config(path, {})
    assert config.cache.dir == tmp_path / "cache"
    assert config.policies.dir == tmp_path / "../policies.d"


@pytest.mark.parametrize("listen", [
    pytest.param("", id="disabled"),
    pytest.param("127.0.0.1:9700", id="ipv4"),
    pytest.param("localhost:80", id="hostname"),
    pytest.param("[::1]:9700", id="ipv6"),
    pytest.param("127.0.0.1:0", id="any-free-port"),
    pytest.param(":9700", id="every-interface"),
])
def test_http_listen_accepts_host_port_or_nothing(tmp_path: Path, listen: str) -> None:
    path = config_file(tmp_path, f'http: {{listen: "{listen}"}}\n')
    assert load_config(path, {}).http.listen == listen


def test_null_sections_keep_their_defaults(tmp_path: Path) -> None:
    path = config_file(tmp_path, "libvirt:\ncache:\nvolumes: {allow: }\n")
    assert load_config(path, {}) == Config(source=path)


@pytest.mark.parametrize(("text", "seconds"), [
    ("", 3600.0), ("cache: {stale_sidecar_hold: 90}\n", 90.0),
    ("cache: {stale_sidecar_hold: 0.5}\n", 0.5), ("cache: {stale_sidecar_hold: 0}\n", 0.0)])
def test_stale_sidecar_hold_is_seconds_and_0_turns_it_off(
        tmp_path: Path, text: str, seconds: float) -> None:
    assert load_config(config_file(tmp_path, text), {}).cache.stale_sidecar_hold == seconds


def test_reconcile_interval_may_be_fractional(tmp_path: Path) -> None:
    path = config_file(tmp_path, "reconcile_interval: 0.5\n")
    assert load_config(path, {}).reconcile_interval == 0.5


# --- errors, each at its line ---------------------------------------------------------------

ERROR_CASES = [
    pytest.param("- a\n", [(1, "the config must be a mapping of sections, got a list")],
                 id="top-level-a-list"),
    pytest.param("libvirt: {uri: x}\nlogging: {}\n",
                 [(2, "unknown key 'logging'; allowed keys: amqp, api, cache, fleet, host, "
                      "http, libvirt, log, policies, prewarm, reconcile_interval, reprovision, s3, "
                      "state, tracing, volumes")],
                 id="unknown-section"),
    pytest.param("s3:\n  endpoint: http://h:1\n  acess_key: x\n",
                 [(3, "s3: unknown key 'acess_key'; allowed keys: access_key, "
                      "access_key_file, endpoint, region, secret_key, secret_key_file")],
                 id="unknown-key-in-section"),
    pytest.param("cache: /var/cache\n", [(1, "cache: expected a mapping, got the string")],
                 id="section-not-a-mapping"),
    pytest.param("libvirt: {uri: 5}\n", [(1, "libvirt.uri: expected a string, got the number 5")],
                 id="uri-not-a-string"),
    pytest.param("libvirt: {uri: ''}\n", [(1, "libvirt.uri: must not be empty")],
                 id="uri-empty"),
    pytest.param("s3:\n  endpoint: 127.0.0.1:9000\n",
                 [(2, "s3.endpoint: expected a URL starting with http:// or https://, "
                      "got the string '127.0.0.1:9000'")],
                 id="endpoint-without-scheme"),
    pytest.param("cache:\n  dir: /c\n  max_size: lots\n",
                 [(3, "cache.max_size: expected a size such as 100GiB, got 'lots'")],
                 id="max-size-lots"),
    pytest.param("cache: {max_size: 0}\n", [(1, "cache.max_size: must be larger than 0")],
                 id="max-size-zero"),
    pytest.param("cache: {max_virtual_size: 0}\n",
                 [(1, "cache.max_virtual_size: must be larger than 0")],
                 id="max-virtual-size-zero"),
    pytest.param("cache:\n  max_virtual_size: huge\n",
                 [(2, "cache.max_virtual_size: expected a size such as 100GiB, got 'huge'")],
                 id="max-virtual-size-huge"),
    pytest.param("cache: {max_concurrent_downloads: 0}\n",
                 [(1, "cache.max_concurrent_downloads: expected a whole number of at least 1")],
                 id="downloads-zero"),
    pytest.param("cache:\n  dir: /c\n  stale_sidecar_hold: -5\n",
                 [(3, "cache.stale_sidecar_hold: expected a number larger than 0, "
                      "got the number -5")], id="stale-sidecar-hold-negative"),
    pytest.param("cache:\n  stale_sidecar_hold: 1h\n",
                 [(2, "cache.stale_sidecar_hold: expected a number larger than 0, "
                      "got the string '1h'")], id="stale-sidecar-hold-not-a-number"),
    pytest.param("cache: {dir: ''}\n", [(1, "cache.dir: must not be empty")], id="cache-dir-empty"),
    pytest.param("policies: {dir: [a]}\n", [(1, "policies.dir: expected a string, got a list")],
                 id="policies-dir-a-list"),
    pytest.param("reconcile_interval: 0\n",
                 [(1, "reconcile_interval: expected a number larger than 0, got the number 0")],
                 id="interval-zero"),
    pytest.param("reconcile_interval: -5\n", [(1, "expected a number larger than 0")],
                 id="interval-negative"),
    pytest.param("reconcile_interval: 5m\n",
                 [(1, "reconcile_interval: expected a number larger than 0, got the string '5m'")],
                 id="interval-a-string"),
    pytest.param("reconcile_interval: true\n", [(1, "got the boolean true")],
                 id="interval-a-boolean"),
    pytest.param("reconcile_interval: .inf\n", [(1, "expected a number larger than 0")],
                 id="interval-infinite"),
    pytest.param("http: {listen: '9700'}\n", [(1, "http.listen: expected host:port")],
                 id="listen-port-only"),
    pytest.param("http: {listen: localhost}\n", [(1, "http.listen: expected host:port")],
                 id="listen-host-only"),
    pytest.param("http: {listen: 'h:99999'}\n", [(1, "http.listen: expected host:port")],
                 id="listen-port-too-large"),
    pytest.param("http: {listen: '::1:9700'}\n", [(1, "http.listen: expected host:port")],
                 id="listen-ipv6-without-brackets"),
    pytest.param("http: {listen: 9700}\n", [(1, "http.listen: expected a string")],
                 id="listen-a-number"),
    pytest.param("amqp:\n  exchange_type: broadcast\n",
                 [(2, "amqp.exchange_type: expected one of direct, fanout, topic, headers, "
                      "got the string 'broadcast'")],
                 id="exchange-type-unknown"),
    pytest.param("amqp: {exchange: ''}\n", [(1, "amqp.exchange: must not be empty")],
                 id="exchange-empty"),
    pytest.param("amqp: {prefetch: 0}\n", [(1, "amqp.prefetch: expected a whole number")],
                 id="prefetch-zero"),
    pytest.param("amqp: {prefetch: 1.5}\n", [(1, "amqp.prefetch: expected a whole number")],
                 id="prefetch-fractional"),
    pytest.param("amqp: {prefetch: '8'}\n", [(1, "got the string '8'")], id="prefetch-a-string"),
    pytest.param("reprovision: {max_concurrent: 0}\n",
                 [(1, "reprovision.max_concurrent: expected a whole number of at least 1")],
                 id="max-concurrent-zero"),
    pytest.param("reprovision: {max_concurrent: true}\n", [(1, "got the boolean true")],
                 id="max-concurrent-a-boolean"),
    pytest.param("volumes:\n  allow:\n    - /dev/vg0/*\n    - dev/vg1/*\n",
                 [(4, "volumes.allow: expected an absolute path glob such as /dev/vg0/*, "
                      "got the string 'dev/vg1/*'")],
                 id="allow-relative-glob"),
    pytest.param("volumes: {allow: /dev/vg0/*}\n",
                 [(1, "volumes.allow: expected a list, got the string")], id="allow-not-a-list"),
    pytest.param("volumes:\n  allow:\n    - 3\n",
                 [(3, "volumes.allow[0]: expected a non-empty string, got the number 3")],
                 id="allow-item-a-number"),
    pytest.param("volumes:\n  lvm_vgs: [vg0, -bad, vg/1]\n",
                 [(2, "volumes.lvm_vgs: expected a volume group name (letters, digits, "
                      "+ _ . -), got the string '-bad'"),
                  (2, "got the string 'vg/1'")],
                 id="lvm-vg-bad-names"),
    pytest.param("volumes: {lvm_vgs: vg0}\n", [(1, "volumes.lvm_vgs: expected a list")],
                 id="lvm-vgs-not-a-list"),
    pytest.param("tracing: {otlp_endpoint: 'collector:4318'}\n",
                 [(1, "tracing.otlp_endpoint: expected a URL starting with http:// or https://")],
                 id="otlp-endpoint-without-scheme"),
    pytest.param("s3:\n  access_key: a\n  access_key_file: /k\n",
                 [(3, "s3: set either 'access_key' or 'access_key_file', not both")],
                 id="secret-inline-and-file"),
    pytest.param("amqp:\n  url: 'http://mq'\n",
                 [(2, "amqp.url: expected an amqp:// or amqps:// URL (the value is a secret "
                      "and is not shown)")],
                 id="amqp-url-wrong-scheme"),
    pytest.param("amqp:\n  url: ''\n", [(2, "amqp.url: must not be empty")], id="amqp-url-empty"),
    pytest.param("libvirt: {uri: x\n", [(2, "invalid YAML")], id="yaml-syntax-error"),
    pytest.param("cache:\n  dir: /a\ncache:\n  dir: /b\n",
                 [(3, "duplicate key 'cache' (first defined on line 1)")], id="duplicate-section"),
]


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_each_config_mistake_is_reported_at_its_line(
        tmp_path: Path, text: str, expected: list[tuple[int, str]]) -> None:
    path = config_file(tmp_path, text)
    problems = problems_of(path)
    assert [(p.file, p.line) for p in problems] == [(str(path), line) for line, _ in expected]
    for problem, (_, words) in zip(problems, expected, strict=True):
        assert words in problem.message


def test_every_config_mistake_is_reported_in_one_go(tmp_path: Path) -> None:
    path = config_file(tmp_path, """\
        cache:
          max_size: lots
        http: {listen: nowhere}
        reconcile_interval: 0
        extra: 1
        """)
    assert [p.line for p in problems_of(path)] == [2, 3, 4, 5]


def test_a_missing_config_file_is_a_problem_at_line_0(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert [str(p) for p in problems_of(path)] == [f"{path}:0: config file not found"]


def test_a_directory_given_as_config_is_a_problem_at_line_0(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path)
    assert (problem.file, problem.line) == (str(tmp_path), 0)
    assert problem.message.startswith("cannot read config file")


# --- secrets ---------------------------------------------------------------------------------


def test_secrets_are_read_from_the_config_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, f"s3: {{access_key: {ACCESS}, secret_key: {SECRET}}}\n"
                                 f"amqp: {{url: '{AMQP_URL}'}}\n")
    config = load_config(path, {})
    assert (config.s3.access_key, config.s3.secret_key, config.amqp.url) == (
        ACCESS, SECRET, AMQP_URL)


def test_secret_files_are_read_relative_to_the_config_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    write(tmp_path / "keys" / "access", f"{ACCESS}\n")
    write(tmp_path / "secret", f"  {SECRET}\n\n")
    write(tmp_path / "amqp", AMQP_URL)
    path = config_file(tmp_path, f"""\
        s3: {{access_key_file: keys/access, secret_key_file: {tmp_path / 'secret'}}}
        amqp: {{url_file: amqp}}
        """)
    config = load_config(path, {})
    assert (config.s3.access_key, config.s3.secret_key, config.amqp.url) == (
        ACCESS, SECRET, AMQP_URL)


def test_the_environment_overrides_secrets_of_the_config_file(tmp_path: Path) -> None:
    write(tmp_path / "secret", "from-file")
    path = config_file(tmp_path, "s3: {access_key: from-config, secret_key_file: secret}\n"
                                 "amqp: {url: 'amqp://config/'}\n")
    environ = {"LVW_S3_ACCESS_KEY": ACCESS, "LVW_S3_SECRET_KEY": SECRET,
               "LVW_AMQP_URL": AMQP_URL}
    config = load_config(path, environ)
    assert (config.s3.access_key, config.s3.secret_key, config.amqp.url) == (
        ACCESS, SECRET, AMQP_URL)


def test_a_secret_file_is_not_needed_when_the_environment_sets_the_secret(
        tmp_path: Path) -> None:
    path = config_file(tmp_path, "s3: {secret_key_file: /nonexistent/secret}\n")
    assert load_config(path, {"LVW_S3_SECRET_KEY": SECRET}).s3.secret_key == SECRET


def test_an_empty_environment_variable_does_not_override(tmp_path: Path) -> None:
    path = config_file(tmp_path, "s3: {access_key: from-config}\n")
    assert load_config(path, {"LVW_S3_ACCESS_KEY": ""}).s3.access_key == "from-config"


def test_systemd_credentials_are_used_when_nothing_else_sets_a_secret(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "s3-access-key", f"{ACCESS}\n")
    write(credentials / "s3-secret-key", SECRET)
    write(credentials / "amqp-url", AMQP_URL)
    path = config_file(tmp_path, "")
    config = load_config(path, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert (config.s3.access_key, config.s3.secret_key, config.amqp.url) == (
        ACCESS, SECRET, AMQP_URL)


def test_systemd_credentials_yield_to_the_config_and_the_environment(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "s3-access-key", "from-credential")
    write(credentials / "s3-secret-key", "from-credential")
    path = config_file(tmp_path, "s3: {access_key: from-config}\n")
    config = load_config(path, {"CREDENTIALS_DIRECTORY": str(credentials),
                                "LVW_S3_SECRET_KEY": "from-env"})
    assert (config.s3.access_key, config.s3.secret_key) == ("from-config", "from-env")


def test_without_any_source_the_defaults_stay(tmp_path: Path) -> None:
    path = config_file(tmp_path, "")
    config = load_config(path, {"CREDENTIALS_DIRECTORY": str(tmp_path / "empty")})
    assert config.amqp.url == AmqpSettings().url
    assert (config.s3.access_key, config.s3.secret_key) == ("", "")


def test_an_unreadable_secret_file_is_reported_at_its_key(tmp_path: Path) -> None:
    path = config_file(tmp_path, "s3:\n  endpoint: http://h:1\n  secret_key_file: missing\n")
    (problem,) = problems_of(path)
    assert (problem.file, problem.line) == (str(path), 3)
    assert problem.message.startswith(
        f"s3.secret_key_file: the secret file {tmp_path / 'missing'} cannot be read")


def test_an_empty_secret_file_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "empty", "\n")
    path = config_file(tmp_path, "amqp: {url_file: empty}\n")
    assert [str(p) for p in problems_of(path)] == [
        f"{path}:1: amqp.url_file: the secret file {tmp_path / 'empty'} is empty"]


def test_the_environment_is_named_when_its_amqp_url_is_wrong(tmp_path: Path) -> None:
    path = config_file(tmp_path, "")
    assert [str(p) for p in problems_of(path, {"LVW_AMQP_URL": "http://x"})] == [
        "environment:0: LVW_AMQP_URL: expected an amqp:// or amqps:// URL "
        "(the value is a secret and is not shown)"]


def test_a_wrong_credential_names_its_file(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "amqp-url", "not-a-url")
    path = config_file(tmp_path, "")
    (problem,) = problems_of(path, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert (problem.file, problem.line) == (str(credentials / "amqp-url"), 0)


def test_secrets_never_appear_in_repr(tmp_path: Path) -> None:
    path = config_file(tmp_path, f"s3: {{access_key: {ACCESS}, secret_key: {SECRET}}}\n"
                                 f"amqp: {{url: '{AMQP_URL}'}}\n")
    config = load_config(path, {})
    for text in (repr(config), str(config), repr(config.s3), repr(config.amqp)):
        for secret in (ACCESS, SECRET, AMQP_URL, "hunter2-pass"):
            assert secret not in text


SECRET_LEAK_CASES = [
    pytest.param("amqp: {url: 'http://u:hunter2-pass@mq/'}\n", {}, id="bad-url-inline"),
    pytest.param("amqp: {url_file: url}\n", {}, id="bad-url-in-file"),
    pytest.param("", {"LVW_AMQP_URL": "http://u:hunter2-pass@mq/"}, id="bad-url-in-env"),
    pytest.param("s3: {secret_key: 987654321}\n", {}, id="secret-not-a-string"),
    pytest.param("s3: {secret_key: [hunter2-pass]}\n", {}, id="secret-a-list"),
    pytest.param("s3: {secret_key: hunter2-pass, secret_key_file: x}\n", {},
                 id="secret-inline-and-file"),
    pytest.param("s3: {secret_key: 'hunter2-pass\n", {}, id="secret-in-broken-yaml"),
    pytest.param("s3: {secret_key: !!int hunter2-pass}\n", {}, id="secret-with-bad-tag"),
]


@pytest.mark.parametrize(("text", "environ"), SECRET_LEAK_CASES)
def test_secrets_never_appear_in_errors(
        tmp_path: Path, text: str, environ: dict[str, str]) -> None:
    write(tmp_path / "url", "http://u:hunter2-pass@mq/")
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ)
    assert caught.value.problems
    for leaked in ("hunter2-pass", "987654321"):
        assert leaked not in str(caught.value)


# --- the policy directory ---------------------------------------------------------------------

IMAGE = "images:\n  {name}:\n    bucket: b\n    key: {name}.qcow2\n    format: qcow2\n"


def test_policy_files_are_read_in_name_order(tmp_path: Path) -> None:
    write(tmp_path / "20-b.yml", 'domains:\n  - {match: "b*", image: one}\n')
    write(tmp_path / "10-a.yaml", IMAGE.format(name="one") + 'domains:\n  - {match: "a*", '
                                                             'image: one}\n')
    write(tmp_path / "30-c.yaml", 'domains:\n  - {match: "c*", image: one}\n')
    write(tmp_path / "README.md", "not a policy")
    write(tmp_path / "40-d.yaml.bak", "not: [valid")
    write(tmp_path / ".#10-a.yaml", "editor lock: [")
    (tmp_path / "50-dir.yaml").mkdir()
    policies = load_policy_dir(tmp_path)
    assert [r.match for r in policies.rules] == ["a*", "b*", "c*"]
    assert policies.rules[1].origin == f"{tmp_path / '20-b.yml'}:2"


def test_an_empty_policy_directory_gives_no_policies(tmp_path: Path) -> None:
    policies = load_policy_dir(tmp_path)
    assert (dict(policies.images), policies.rules) == ({}, ())


def test_a_missing_policy_directory_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_policy_dir(tmp_path / "nope")
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / 'nope'}:0: policy directory does not exist"]


def test_problems_of_a_policy_directory_come_in_file_order(tmp_path: Path) -> None:
    write(tmp_path / "10-a.yaml", IMAGE.format(name="one"))
    (tmp_path / "20-b.yaml").write_bytes(b"images: \xff\n")
    write(tmp_path / "30-c.yaml", IMAGE.format(name="one"))
    with pytest.raises(ConfigError) as caught:
        load_policy_dir(tmp_path)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / '20-b.yaml'}:0: not UTF-8 text",
        f"{tmp_path / '30-c.yaml'}:2: images.one: image 'one' is already defined at "
        f"{tmp_path / '10-a.yaml'}:2",
    ]


# --- check: config problems, then policy problems ---------------------------------------------


def test_check_reports_config_problems_then_policy_problems(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    write(tmp_path / "policies" / "p.yaml", "domains:\n  - {match: x, image: ghost}\n")
    path = config_file(tmp_path, "policies: {dir: policies}\nreconcile_interval: never\n")
    assert [str(p) for p in check_all(path, {})] == [
        f"{path}:2: reconcile_interval: expected a number larger than 0, "
        "got the string 'never'",
        f"{tmp_path / 'policies' / 'p.yaml'}:2: domains[0].image: unknown image 'ghost' "
        "(known images: none are defined)",
    ]


def test_check_of_a_good_setup_finds_nothing(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    example = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"
    write(tmp_path / "policies" / "example.yaml", example.read_text())
    path = config_file(tmp_path, "policies: {dir: policies}\n")
    assert check_all(path, {}) == []


def test_check_skips_policies_when_the_config_names_no_usable_directory(
        tmp_path: Path) -> None:
    path = config_file(tmp_path, "policies: {dir: 5}\n")
    assert [p.message for p in check_all(path, {})] == [
        "policies.dir: expected a string, got the number 5"]


def test_check_reports_a_missing_policy_directory(tmp_path: Path) -> None:
    path = config_file(tmp_path, "policies: {dir: nowhere}\n")
    assert [str(p) for p in check_all(path, {})] == [
        f"{tmp_path / 'nowhere'}:0: policy directory does not exist"]


def test_check_of_a_missing_config_reports_only_that(tmp_path: Path) -> None:
    assert [p.line for p in check_all(tmp_path / "absent.yaml", {})] == [0]


# --- the log level (the one setting a SIGHUP applies) --------------------------------------


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "critical"])
def test_the_log_level_is_read(tmp_path: Path, level: str) -> None:
    config = load_config(config_file(tmp_path, f"log: {{level: {level}}}\n"), {})
    assert config.log.level == level


def test_without_a_log_level_the_command_line_decides(tmp_path: Path) -> None:
    assert load_config(config_file(tmp_path, "log: {}\n"), {}).log.level is None


@pytest.mark.parametrize(("text", "message"), [
    ("log: {level: loud}\n", "log.level: expected one of debug, info, warning, error, critical"),
    ("log: {level: INFO}\n", "log.level: expected one of"),
    ("log: {level: 3}\n", "log.level: expected one of"),
    ("log: {format: json}\n", "format"),
])
def test_a_bad_log_setting_is_a_problem_at_its_line(tmp_path: Path, text: str,
                                                    message: str) -> None:
    problems = problems_of(config_file(tmp_path, text))
    assert len(problems) == 1 and problems[0].line == 1
    assert message in problems[0].message
