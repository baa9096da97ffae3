"""Command line: argument parsing and logging setup, nothing else."""

from __future__ import annotations

import argparse
import logging
import sys

from l4lb._version import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="l4lb", description="A userspace L4 load balancer with a splice data plane."
    )
    p.add_argument("--version", action="version", version=f"l4lb {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the load balancer in the foreground")
    run.add_argument("--config", "-c", required=True, help="TOML config file")
    run.add_argument("--workers", type=int, help="worker threads (overrides dataplane.workers)")
    run.add_argument("--ready-file", help="write pid, admin and listen addresses here as JSON")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")

    kube = sub.add_parser("kube-proxy", help="serve Kubernetes Services (kube-proxy's flags)")
    from l4lb.k8s.options import add_arguments

    add_arguments(kube)

    sub.add_parser(
        "cleanup", help="remove every iptables rule and IPVS service l4lb installs, and exit"
    )

    status = sub.add_parser("status", help="show services, backends and counters")
    status.add_argument("--admin", default="127.0.0.1:9901", help="admin API address")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level != "debug":
        # One line per admin request drowns the lines that matter.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``l4lb`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        from l4lb.config import ConfigError, load_config
        from l4lb.permissions import admin_token, check_config_file

        try:
            # The same file checks as `l4lb run`, so a config that passes here also starts.
            check_config_file(args.file)
            cfg = load_config(args.file)
            admin_token(cfg.admin)
        except ConfigError as e:
            print(f"l4lb: {e}", file=sys.stderr)
            return 1
        print(f"{args.file}: ok ({len(cfg.services)} service(s))")
        return 0
    if args.command == "kube-proxy":
        from l4lb.k8s.options import OptionsError, options_from_args

        try:
            opts = options_from_args(args)
        except OptionsError as e:
            print(f"l4lb kube-proxy: {e}", file=sys.stderr)
            return 2
        _setup_logging(args.log_level)
        from l4lb.k8s.proxy import main as kube_proxy_main

        return kube_proxy_main(opts)
    if args.command == "cleanup":
        from l4lb.cleanup import main as cleanup_main

        return cleanup_main()
    if args.command == "status":
        from l4lb import status

        return status.main(args.admin, as_json=args.json)
    if args.workers is not None and not 1 <= args.workers <= 256:
        print(f"l4lb: --workers must be from 1 to 256, got {args.workers}", file=sys.stderr)
        return 2
    _setup_logging(args.log_level)
    import uvloop

    from l4lb.app import App

    app = App(args.config, workers=args.workers, ready_file=args.ready_file)
    return uvloop.run(app.serve())


if __name__ == "__main__":
    sys.exit(main())
