"""The ``gateway`` command: argument parsing only; each subcommand calls into its module."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .admin.cli import add_operator_commands
from .settings import ConfigError, Settings, load_settings


def _checked_settings(config: Path) -> Settings | None:
    """The config at ``config`` with every start-up check ``serve`` makes (None, after printing why, if
    one fails): ``check-config`` and ``serve`` share this, so they can never disagree about a file."""
    from .server import preflight

    try:
        settings = load_settings(config)
        preflight(settings)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return None
    return settings


def _serve(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.bootstrap_policy is not None and not args.bootstrap_policy.is_file():
        print(f"gateway: --bootstrap-policy: no such file: {args.bootstrap_policy}", file=sys.stderr)
        return 2
    settings = _checked_settings(args.config)
    if settings is None:
        return 2
    if args.bootstrap_policy is not None:
        from .bootstrap import check_policy_file

        try:
            check_policy_file(args.bootstrap_policy, tuple(settings.tiers))
        except ConfigError as exc:
            print(f"gateway: config error: {exc}", file=sys.stderr)
            return 2
    from .server import serve

    return serve(settings, workers=args.workers, bootstrap_policy=args.bootstrap_policy)


def _check_config(args: argparse.Namespace) -> int:
    if _checked_settings(args.config) is None:
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
    claims = {
        "sub": args.subject,
        "org": args.org,
        "org_name": args.org_name,
        "country": args.country,
        "tier": args.tier,
        "iss": args.issuer,
        "aud": args.audience,
        "iat": now,
        "exp": now + args.ttl,
    }
    print(jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm="HS256"))
    return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Export-control access gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, type=Path, help="YAML config file")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the public port")
    serve.add_argument(
        "--bootstrap-policy", type=Path, default=None, help="import this policy file at start if Redis holds no policy"
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", required=True, type=Path)
    check.set_defaults(func=_check_config)

    mock = sub.add_parser("mock-upstream", help="development mock of an OpenAI-compatible model server")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8000)
    mock.set_defaults(func=_mock_upstream)

    token = sub.add_parser(
        "dev-token",
        help="print a development HS256 token",
        description="Print a signed HS256 JWT for trying the gateway (config/dev.yaml accepts it). "
        "Never for production: anyone with the secret can mint any identity.",
        formatter_class=_DefaultsHelp,
    )
    token.add_argument(
        "--secret-env",
        default="GATEWAY_DEV_HS256_SECRET",
        metavar="VAR",
        help="environment variable holding the HS256 secret (the gateway's auth.hs256_secret_env)",
    )
    token.add_argument("--subject", default="dev-user", help="the caller's subject (claim sub)")
    token.add_argument("--org", default="dev-org", help="the caller's organisation (claim org)")
    token.add_argument(
        "--org-name",
        default=None,
        help="the organisation's name, screened against the denied-parties list (claim org_name; default: not sent)",
    )
    token.add_argument(
        "--country",
        default="US",
        help="the caller's country, ISO 3166-1 alpha-2 or a subdivision such as UA-43 (claim country)",
    )
    token.add_argument("--tier", default="partner", help="the caller's tier, a key of the config's tiers (claim tier)")
    token.add_argument("--issuer", default="https://idp.example", help="claim iss; must equal auth.issuer")
    token.add_argument("--audience", default="model-gateway", help="claim aud; must equal auth.audience")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime: exp is now plus this")
    token.set_defaults(func=_dev_token)

    add_operator_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
