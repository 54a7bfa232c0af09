"""The command line: ``libvirt-volume-watcher`` (also ``python -m watcher``).

Commands follow the contract in docs/operating.md ("Command line"): ``run``, ``check``,
``reprovision``, ``status``, ``cache list|warm|verify|prune`` and ``fleet status``. Exit
codes: 0 success, 1 a problem the command reports (invalid config, failed verification...),
2 bad usage. Results go to stdout and logs to stderr, so ``--json`` output can be piped;
``status``, ``cache list`` and ``cache verify`` only read the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher import __version__
from watcher.config import DEFAULT_CONFIG_PATH, check_config, load_config, load_policy_dir
from watcher.core.address import parse_listen
from watcher.core.errors import ConfigError, WatcherError
from watcher.core.fleet import host_matches
from watcher.core.paths import IMAGE_NAME_RULE, is_image_name
from watcher.core.policy import PolicySet
from watcher.core.triage import UNMATCHED, is_outdated, listed_state
from watcher.core.units import format_size
from watcher.settings import LOG_LEVELS, Config

if TYPE_CHECKING:
    from watcher.adapters.hypervisor import DomainRow


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libvirt-volume-watcher",
        description="Pre-warms VM images from S3 and reprovisions libvirt root volumes on request.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # -c/--config is accepted before the subcommand and after it; after wins.
    parser.add_argument("-c", "--config", dest="config_before", type=Path, default=None,
                        metavar="PATH",
                        help=f"daemon config (default {DEFAULT_CONFIG_PATH})")
    sub = parser.add_subparsers(dest="command", required=True)
    version = f"libvirt-volume-watcher {__version__}"

    def with_config(p: argparse.ArgumentParser, dest: str = "config") -> argparse.ArgumentParser:
        p.add_argument("--version", action="version", version=version)
        p.add_argument("-c", "--config", dest=dest, type=Path, default=None, metavar="PATH",
                       help=f"daemon config (default {DEFAULT_CONFIG_PATH})")
        return p

    run = with_config(sub.add_parser("run", help="run the daemon in the foreground"))
    run.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    run.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                     help="the level to start at (default: the config's log.level, else info)")
    with_config(sub.add_parser("check", help="validate the config and every policy file"))

    rep = with_config(sub.add_parser("reprovision", help="tag a domain for reprovisioning"))
    rep.add_argument("domain")
    rep.add_argument("--image", type=_image_name,
                     help="image name to write instead of the policy's")
    rep.add_argument("--connect", help="libvirt URI (default: the config's, else qemu:///system)")
    rep.add_argument("--wait", action="store_true",
                     help="follow the request to its end; exit 0 only when provisioned")
    rep.add_argument("--shutdown", action="store_true",
                     help="with --wait: shut the domain down (ACPI, then hard after --timeout)")
    rep.add_argument("--timeout", type=float, default=120.0, metavar="S",
                     help="seconds an ACPI shutdown may take before a hard stop (default 120)")
    rep.add_argument("--cancel", action="store_true",
                     help="remove a pending request instead (not one being written)")

    explain = with_config(sub.add_parser(
        "explain", help="what a reprovision of DOMAIN would do now, without doing it"))
    explain.add_argument("domain")
    explain.add_argument("--json", action="store_true")

    status = with_config(sub.add_parser(
        "status", help="domains, images and the cache; or one DOMAIN in detail"))
    status.add_argument("domain", nargs="?", help="one domain in detail")
    status.add_argument("--json", action="store_true")

    # A group's own -c (``cache -c PATH list``) has a dest of its own, so that an absent
    # -c after the second word does not overwrite it.
    cache = with_config(sub.add_parser("cache", help="operate on the image cache"),
                        dest="config_group")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    with_config(cache_sub.add_parser("list", help="list cache entries")).add_argument(
        "--json", action="store_true")
    warm = with_config(cache_sub.add_parser("warm", help="download and verify an image now"))
    warm.add_argument("image")
    with_config(cache_sub.add_parser(
        "verify", help="re-hash every entry and report corrupt ones (changes nothing)"))
    prune = with_config(cache_sub.add_parser(
        "prune", help="remove leftovers and entries that are not the current version of a "
                      "policy image"))
    prune.add_argument("--corrupt", action="store_true",
                       help="also re-hash every entry and remove the corrupt ones")

    fleet = with_config(
        sub.add_parser("fleet", help="every host's status, from fleet.status_bucket"),
        dest="config_group")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    with_config(fleet_sub.add_parser("status", help="hosts x images; stale hosts marked")
                ).add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.config = args.config or getattr(args, "config_group", None) or args.config_before
    if args.command == "reprovision" and args.cancel and (args.wait or args.image):
        parser.error("reprovision --cancel goes without --wait, --shutdown and --image")
    if args.command == "reprovision" and args.shutdown and not args.wait:
        parser.error("reprovision --shutdown goes with --wait")
    if args.config is None and args.command != "reprovision":
        args.config = DEFAULT_CONFIG_PATH  # reprovision reads it only when it exists
    if args.command != "run":  # run sets up its own; structlog's default would use stdout
        from watcher.runtime.observability import configure_logging

        configure_logging(level="warning", stream=sys.stderr)
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "reprovision":
            return _reprovision(args)
        config = load_config(args.config)
        if args.command == "run":
            return _run(config, args.log_format, args.log_level or config.log.level or "info")
        if args.command == "status" and args.domain:
            return _status_of(config, args.domain, as_json=args.json)
        if args.command == "status":
            return _status(config, as_json=args.json)
        if args.command == "explain":
            return _explain(config, args.domain, as_json=args.json)
        if args.command == "fleet":
            return _fleet_status(config, as_json=args.json)
        return _cache(config, args)
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return 1
    except WatcherError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _image_name(text: str) -> str:
    """``--image`` as argparse checks it: a bad name is a usage error (exit 2)."""
    if not is_image_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an image name ({IMAGE_NAME_RULE})")
    return text


def _check(path: Path) -> int:
    """Problems and warnings go to stderr, the verdict and the host's scope to stdout."""
    report = check_config(path)
    problems = report.problems
    for problem in problems:
        print(problem, file=sys.stderr)
    for warning in report.warnings:  # shown, but they do not fail the check
        print(warning, file=sys.stderr)
    if not problems:
        print(f"{path}: ok")
        _print_host_scope(load_config(path))
    return 1 if problems else 0


def _print_host_scope(config: Config) -> None:
    """What the policies' ``hosts:`` globs mean on this host."""
    host = config.host.resolved
    policies = load_policy_dir(config.policies.dir).on_host(host)
    for name, image in sorted(policies.images.items()):
        where = ", ".join(image.hosts) or "all hosts"
        verdict = "pre-warmed here" if policies.is_for_host(image) else "not pre-warmed here"
        print(f"host {host}: image {name} (hosts: {where}): {verdict}")
    for rule in policies.rules:
        if rule.hosts:
            verdict = "applies here" if host_matches(rule.hosts, host) else "does not apply here"
            print(f"host {host}: rule {rule.match!r} at {rule.origin} "
                  f"(hosts: {', '.join(rule.hosts)}): {verdict}")


def _run(config: Config, log_format: str, log_level: str) -> int:
    from watcher.runtime.allocator import tune_allocator
    from watcher.runtime.observability import configure_logging, configure_tracing
    from watcher.runtime.supervisor import Daemon

    tune_allocator()  # before any thread starts
    configure_logging(json=None if log_format == "auto" else log_format == "json", level=log_level)
    provider = configure_tracing(config.tracing, host_name=config.host.resolved)

    async def main_loop() -> int:
        return await Daemon(config).run()

    try:
        return asyncio.run(main_loop())
    finally:
        provider.shutdown()


def _fleet_status(config: Config, *, as_json: bool) -> int:
    from datetime import UTC, datetime

    from watcher.adapters.fleet_status import FleetStatusStore
    from watcher.core.fleet import fleet_view, view_json, view_lines

    if not config.fleet.status_bucket:
        print("error: fleet.status_bucket is not set in the config", file=sys.stderr)
        return 1
    view = fleet_view(FleetStatusStore(config.s3, config.fleet.status_bucket).read_all(),
                      datetime.now(UTC))
    if as_json:
        print(json.dumps(view_json(view), indent=2))
    else:
        for line in view_lines(view):
            print(line)
    return 0


def _reprovision(args: argparse.Namespace) -> int:
    from watcher.adapters.hypervisor.queries import request_reprovision

    config = _reprovision_config(args.config)
    uri = args.connect or (config.libvirt.uri if config else "qemu:///system")
    if args.cancel:
        from watcher.adapters.hypervisor.queries import cancel_request

        cancel_request(uri, args.domain)
        print(f"{args.domain}: reprovision request cancelled")
        return 0
    from watcher.follow import Console, follow, unmatched_here

    unmatched = unmatched_here(config, args.domain)  # this watcher leaves such a request be
    if unmatched is not None and args.wait:
        print(f"{args.domain}: not requested, --wait would only time out: {unmatched}",
              file=sys.stderr)
        return 1
    request_reprovision(uri, args.domain, args.image)
    print(f"{args.domain}: reprovision requested; it is rewritten when it is shut off")
    if unmatched is not None:
        print(f"warning: {args.domain}: {unmatched}", file=sys.stderr)
    if not args.wait:
        return 0

    listen = config.http.listen if config else ""
    metrics = f"http://{_local(listen)}/metrics" if listen else None
    return follow(uri, args.domain, shutdown=args.shutdown, timeout=args.timeout,
                  metrics_url=metrics, console=Console(sys.stdout))


def _reprovision_config(path: Path | None) -> Config | None:
    """The config ``reprovision`` reads: ``-c``'s (its errors are errors), else the default
    file when there is one (a broken default is a warning: the tag needs only libvirt)."""
    if path is not None:
        return load_config(path)
    if not DEFAULT_CONFIG_PATH.exists():
        return None
    try:
        return load_config(DEFAULT_CONFIG_PATH)
    except ConfigError as err:
        first = err.problems[0] if err.problems else str(err)
        print(f"warning: {DEFAULT_CONFIG_PATH} not used: {first}", file=sys.stderr)
        return None


def _local(listen: str) -> str:
    """Where this host reaches a listener bound to ``listen`` (all interfaces: loopback)."""
    host, port = parse_listen(listen)
    if host in (None, "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cache_for(config: Config, *, create: bool = False) -> Any:
    """The cache, read (nothing is created unless ``create``), and the policies."""
    from watcher.adapters.s3 import S3Store
    from watcher.cache import Cache

    policies = load_policy_dir(config.policies.dir).on_host(config.host.resolved)
    cache = Cache(config.cache.dir, S3Store(config.s3), max_size=config.cache.max_size,
                  max_virtual_size=config.cache.max_virtual_size, policies=lambda: policies,
                  stale_sidecar_hold=0)  # a command ends at once: nothing is held
    asyncio.run(cache.load(create=create))
    return cache, policies


def _explain(config: Config, domain: str, *, as_json: bool) -> int:
    from watcher.explain import explain

    cache, policies = _cache_for(config)
    answer = asyncio.run(explain(config, policies, cache, domain))
    if as_json:
        print(json.dumps(answer.as_json(), indent=2))
    else:
        print("\n".join(answer.lines()))
    return 0


def _kept(policies: Any) -> set[str]:
    return {image.name for image in policies.images_to_keep_warm()}


def _status_of(config: Config, domain: str, *, as_json: bool) -> int:
    """One domain in detail: the job's view (``explain``) plus its state and progress."""
    from watcher.explain import explain
    from watcher.follow import write_progress

    cache, policies = _cache_for(config)
    answer = asyncio.run(explain(config, policies, cache, domain))
    state = answer.parsed
    listen = config.http.listen
    written = (write_progress(f"http://{_local(listen)}/metrics", answer.domain)
               if listen and state is not None and state.kind == "provisioning" else None)
    progress = written.ratio if written is not None else None
    kind = (listed_state(answer.domain, state.kind, policies) or state.kind) if state else None
    detail = {"domain": answer.domain, "uuid": answer.uuid, "power": answer.power,
              "state": kind, "element": answer.state, "image": answer.image, "rule": answer.rule,
              "provisioned_sha256": state.sha256 if state else None,
              "reason": answer.unmatched if kind == UNMATCHED else state.reason if state else None,
              "root_disk": answer.disk,
              "volume": answer.volume, "write_progress": progress, "next": answer.now}
    if as_json:
        print(json.dumps(detail, indent=2))
        return 0
    for key, value in detail.items():
        if value is not None and value != "":
            print(f"{key + ':':<20} {value}")
    return 0


def _status(config: Config, *, as_json: bool) -> int:
    from watcher.adapters.hypervisor.queries import domain_overview

    cache, policies = _cache_for(config)
    # Every domain is read: a tagged one no rule matches is listed as unmatched.
    rows = domain_overview(config.libvirt.uri, lambda name: True)
    domains = [_domain_row(row, policies, cache) for row in rows
               if listed_state(row.domain, row.state, policies) is not None]
    entries = _cache_rows(config, cache, policies)
    if as_json:
        print(json.dumps({"domains": domains, "cache": entries}, indent=2, default=str))
        return 0
    print(f"{'DOMAIN':<20} {'POLICY':<13} {'IMAGE':<16} {'STATE':<14} {'PROVISIONED':<13} OUTDATED")
    for row in domains:
        print(f"{row['domain']:<20} {row.get('match') or '-':<13} {row.get('image') or '-':<16} "
              f"{row.get('state') or '-':<14} {str(row.get('provisioned_sha256') or '-')[:12]:<13} "
              f"{'yes' if row['outdated'] else 'no'}")
    print()
    _print_entries(entries)
    return 0


def _domain_row(row: DomainRow, policies: PolicySet, cache: Any) -> dict[str, Any]:
    """One ``status`` domain: the libvirt row, the rule that matched it, and outdated?"""
    rule = policies.rule_for(row.domain)
    image = rule.image if rule is not None else None
    current = cache.current(image) if image else None
    current_digest = current.digest if current else None
    return {
        "domain": row.domain, "uuid": row.uuid,
        "match": rule.match if rule is not None else None, "image": image,
        "power": row.power, "state": row.state if rule is not None else UNMATCHED,
        "provisioned_image": row.provisioned_image,
        "provisioned_sha256": row.provisioned_sha256, "finished": row.finished,
        "reason": row.reason if rule is not None else policies.why_unmatched(row.domain),
        "current_sha256": current_digest,
        "outdated": is_outdated(row.provisioned_sha256, current_digest),
    }


def _cache_rows(config: Config, cache: Any, policies: PolicySet) -> list[dict[str, Any]]:
    """Entries (state ``cached``), then downloads held for a corrected sidecar (``held``:
    refused so far, not inspected; read from ``held/``, as the daemon wrote them)."""
    from watcher.cache.held import read_held

    pinned = cache.pinned_digests(_kept(policies))
    rows = [_entry_row(e, pinned) for e in cache.entries()]
    return rows + [{"digest": h.digest, "image": h.image, "format": h.format, "size": h.size,
                    "virtual_size": None, "source": f"s3://{h.bucket}/{h.key}",
                    "etag": h.etag, "held_at": h.held_at, "expires_at": h.expires_at,
                    "pinned": False, "state": "held"} for h in read_held(config.cache.dir)]


def _entry_row(entry: Any, pinned: set[str]) -> dict[str, Any]:
    return {"digest": entry.digest, "image": entry.image, "format": entry.format,
            "size": entry.size, "virtual_size": entry.virtual_size,
            "source": f"s3://{entry.bucket}/{entry.key}", "etag": entry.etag,
            "last_used_at": entry.last_used_at, "verified_at": entry.verified_at,
            "pinned": entry.digest in pinned, "state": "cached"}


def _print_entries(entries: list[dict[str, Any]]) -> None:
    print("DIGEST        IMAGE            FORMAT  SIZE       VIRTUAL    PINNED  STATE   SOURCE")
    for e in entries:
        virtual = "-" if e["virtual_size"] is None else format_size(e["virtual_size"])
        print(f"{e['digest'][:12]:<13} {e['image']:<16} {e['format']:<7} "
              f"{format_size(e['size']):<10} {virtual:<10} "
              f"{'yes' if e['pinned'] else 'no':<7} {e['state']:<7} {e['source']}")


def _cache(config: Config, args: argparse.Namespace) -> int:
    cache, policies = _cache_for(config, create=args.cache_command in ("warm", "prune"))
    if args.cache_command == "list":
        rows = _cache_rows(config, cache, policies)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_entries(rows)
        return 0
    if args.cache_command == "warm":
        image = policies.images.get(args.image)
        if image is None:
            print(f"error: no policy defines an image named {args.image!r}", file=sys.stderr)
            return 1
        try:  # an image not uploaded yet is an error main() reports
            entry = asyncio.run(cache.ensure(image))
        finally:
            cache.release()
        print(f"{image.name}: {entry.digest} cached ({format_size(entry.size)}, "
              f"virtual {format_size(entry.virtual_size)})")
        return 0
    if args.cache_command == "verify":
        results = asyncio.run(cache.verify())
        for r in results:
            print(f"{r.digest}: {r.detail}")
        bad = [r for r in results if not r.ok]
        print(f"{len(results)} entries verified, {len(bad)} bad")
        if bad:
            print("'cache prune --corrupt' removes bad entries; they are fetched again when needed")
        return 1 if bad else 0
    from watcher.cache.held import read_held

    held = read_held(config.cache.dir)
    leftovers = asyncio.run(cache.remove_leftovers())  # held too, unless a live one holds it
    still_held = {(h.image, h.etag) for h in read_held(config.cache.dir)}
    for h in held:
        kept = (h.image, h.etag) in still_held
        print(f"held download of {h.image} ({h.digest}): "
              f"{'kept (a running daemon holds it)' if kept else 'removed'}")
    removed = asyncio.run(cache.prune(_kept(policies)))
    for digest in removed:
        print(f"removed {digest}")
    if args.corrupt:
        for r in asyncio.run(cache.remove_corrupt()):
            print(f"removed {r.digest}: {r.detail}")
            removed.append(r.digest)
    print(f"{len(removed)} entries removed, {leftovers} leftover files removed")
    return 0
