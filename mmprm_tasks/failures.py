"""What a user sees when a stage fails because something it depends on failed.

An outage (Postgres gone or frozen, the S3 server down, a judge or policy server failing) is
reported as its first cause in one line plus a hint, not as a chain of tracebacks: the stage's
clean-up may fail on the same outage, and those failures are logged, never raised over the first
cause (see :func:`best_effort`).  Exit codes of the ``mmprm`` command line:

* 0 done; 1 finished with rejected records or unfinished work, or a configuration error;
* 2 wrong usage (click's); 3 a dependency failed: rerun once it is back, work resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

EXIT_CONFIGURATION = 1
EXIT_DEPENDENCY = 3

# S3 error codes of credentials or permissions: configuration, never an outage to wait out.
S3_CREDENTIAL_ERRORS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                        "AccountProblem", "InvalidToken", "ExpiredToken")

_RERUN = "rerun the same command once it is back: finished work is kept and nothing is written twice"


@dataclass(frozen=True)
class Failure:
    cause: str  # one line: the exception type and the first line of its message
    hint: str
    exit_code: int


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message`` of the error that actually happened (a driver error
    rather than SQLAlchemy's wrapper, a connection error rather than urllib3's retry summary)."""
    inner: BaseException = exc
    if getattr(inner, "orig", None) is not None:  # SQLAlchemy wraps the driver's error
        inner = inner.orig  # type: ignore[assignment]
    reason = getattr(inner, "reason", None)  # urllib3's MaxRetryError names the last failure
    if isinstance(reason, BaseException):
        inner = reason
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    text = f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(exc: BaseException) -> Failure | None:
    """The one-line report of an outage or configuration error; None for anything else (a bug,
    whose traceback is worth seeing)."""
    import psycopg
    import sqlalchemy.exc
    import urllib3.exceptions
    from minio.error import MinioException

    from .db import SchemaError
    from .policy import PolicyError
    from .settings import ConfigurationError
    from .verify import VerificationError

    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, psycopg.OperationalError)):
        return Failure(one_line(exc), "Postgres is unreachable, frozen or restarting (database_url; time-outs "
                       f"timeouts.db_*); {_RERUN}", EXIT_DEPENDENCY)
    if getattr(exc, "code", None) in S3_CREDENTIAL_ERRORS and isinstance(exc, MinioException):
        return Failure(one_line(exc), "the S3 object store refuses these credentials or this bucket "
                       "(store.access_key, store.secret_key, store.bucket); fix the configuration, retrying as is "
                       "cannot help", EXIT_CONFIGURATION)
    if isinstance(exc, (urllib3.exceptions.HTTPError, MinioException)):
        return Failure(one_line(exc), "the S3 object store is unreachable, frozen or failing (store.endpoint; "
                       f"time-outs timeouts.s3_*); {_RERUN}", EXIT_DEPENDENCY)
    if isinstance(exc, VerificationError):
        return Failure(one_line(exc), "an answer could not be checked (the judge or a rule check failed) and no "
                       f"label was written; fix the judge (verify.judge_*) and {_RERUN}", EXIT_DEPENDENCY)
    if isinstance(exc, PolicyError):
        return Failure(one_line(exc), f"the policy engine failed (policy.*); {_RERUN}", EXIT_DEPENDENCY)
    if isinstance(exc, (ConfigurationError, SchemaError, LookupError)):
        return Failure(one_line(exc), "fix the configuration; retrying as is cannot help", EXIT_CONFIGURATION)
    return None


def best_effort(action: Callable[[], object], what: str, first: BaseException) -> None:
    """Run a clean-up step after ``first`` failed; its own failure (often the same outage) is
    logged in one line and never replaces ``first``."""
    try:
        action()
    except BaseException as exc:  # noqa: BLE001 - the first cause is the one the caller raises
        if exc is not first:
            log.warning("%s after %s failed too: %s", what, type(first).__name__, one_line(exc))
