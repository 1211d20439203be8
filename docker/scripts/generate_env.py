#!/usr/bin/env python3
"""Print a ready .env for docker-compose.yml: .env.example with its empty secrets filled.

    python docker/scripts/generate_env.py > .env
    python docker/scripts/generate_env.py --keep .env > .env.new   # keep the values already set

Every other line is copied as written. Secrets are URL-safe (they go into connection URLs); the
Fernet key is 32 random bytes in url-safe base64, as Airflow requires. Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import re
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _token() -> str:
    return secrets.token_hex(24)


# Which variables are secrets, and how to make one.
GENERATORS = {
    "POSTGRES_PASSWORD": _token,
    "AIRFLOW_DB_PASSWORD": _token,
    "STEP_INDEX_DB_PASSWORD": _token,
    "REDIS_PASSWORD": _token,
    "AIRFLOW_FERNET_KEY": _fernet_key,
    "AIRFLOW_JWT_SECRET": _token,
    "AIRFLOW_API_SECRET_KEY": _token,
    "AIRFLOW_ADMIN_PASSWORD": _token,
    "MINIO_ROOT_PASSWORD": _token,
    "S3_SECRET_KEY": _token,
    "VLLM_API_KEY": _token,
}

_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def parse_env(text: str) -> dict[str, str]:
    """``NAME=value`` lines of a .env file (comments and blank lines skipped, no quoting rules)."""
    values = {}
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line.strip())
        if match:
            values[match[1]] = match[2]
    return values


def render(example: str, keep: dict[str, str] | None = None) -> str:
    keep = keep or {}
    out = []
    for line in example.splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            name, value = match[1], match[2]
            if keep.get(name):
                value = keep[name]
            elif not value and name in GENERATORS:
                value = GENERATORS[name]()
            line = f"{name}={value}"
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", type=Path, default=REPO / ".env.example")
    parser.add_argument("--keep", type=Path, help="an existing .env whose non-empty values win")
    args = parser.parse_args(argv)
    keep = parse_env(args.keep.read_text()) if args.keep else None
    sys.stdout.write(render(args.example.read_text(), keep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
