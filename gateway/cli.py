"""The ``gateway`` command: argument parsing only; each subcommand calls into its module."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .operator_cli import add_operator_commands
from .settings import ConfigError, load_settings


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.bootstrap_policy is not None and not args.bootstrap_policy.is_file():
        print(f"gateway: --bootstrap-policy: no such file: {args.bootstrap_policy}", file=sys.stderr)
        return 2
    from .server import preflight, serve

    try:
        preflight(settings)
        if args.bootstrap_policy is not None:
            from .bootstrap import check_policy_file

            check_policy_file(args.bootstrap_policy, tuple(settings.tiers))
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    return serve(settings, workers=args.workers, bootstrap_policy=args.bootstrap_policy)


def _check_config(args: argparse.Namespace) -> int:
    try:
        load_settings(args.config)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: ok")
    return 0


def _mock_upstream(args: argparse.Namespace) -> int:
    from .mock_upstream import run_mock

    run_mock(args.host, args.port)
    return 0


def _dev_token(args: argparse.Namespace) -> int:
    """A development HS256 token, signed with the secret in the named environment variable."""
    import os

    import jwt

    secret = os.environ.get(args.secret_env)
    if not secret:
        print(f"gateway: --secret-env: environment variable {args.secret_env} is not set", file=sys.stderr)
        return 2
    now = int(time.time())
    claims = {"sub": args.subject, "org": args.org, "org_name": args.org_name, "country": args.country,
              "tier": args.tier, "iss": args.issuer, "aud": args.audience, "iat": now,
              "exp": now + args.ttl}
    print(jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm="HS256"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Export-control access gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, type=Path, help="YAML config file")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the public port")
    serve.add_argument("--bootstrap-policy", type=Path, default=None,
                       help="import this policy file at start if Redis holds no policy")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", required=True, type=Path)
    check.set_defaults(func=_check_config)

    mock = sub.add_parser("mock-upstream", help="development mock of an OpenAI-compatible model server")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8000)
    mock.set_defaults(func=_mock_upstream)

    token = sub.add_parser("dev-token", help="print a development HS256 token")
    token.add_argument("--secret-env", default="GATEWAY_DEV_HS256_SECRET")
    token.add_argument("--subject", default="dev-user")
    token.add_argument("--org", default="dev-org")
    token.add_argument("--org-name", default=None)
    token.add_argument("--country", default="US")
    token.add_argument("--tier", default="partner")
    token.add_argument("--issuer", default="https://idp.example")
    token.add_argument("--audience", default="model-gateway")
    token.add_argument("--ttl", type=int, default=3600)
    token.set_defaults(func=_dev_token)

    add_operator_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
