#!/usr/bin/env bash
# Entrypoint of the MM-PRM GPU worker image, run under dumb-init.
#
# Same command convention as the official Airflow image's /entrypoint, so one docker-compose
# `command:` works for both images:
#   celery worker -q gpu         -> airflow celery worker -q gpu
#   airflow celery worker -q gpu -> airflow celery worker -q gpu
#   bash | python | mmprm ...    -> run as given (debugging, `mmprm db upgrade`, ...)
set -euo pipefail

# The image may run under any uid with gid 0 (docker-compose passes AIRFLOW_UID). HOME is
# group-writable for gid 0; should it not be writable, caches (torch, triton, HF) go to /tmp.
if [[ ! -w "${HOME:-/nonexistent}" ]]; then
    export HOME=/tmp/airflow-home
    mkdir -p "${HOME}"
fi

if [[ $# -eq 0 ]]; then
    set -- celery worker -q gpu
fi

case "$1" in
    bash | sh | python | python3 | mmprm | nvidia-smi)
        exec "$@"
        ;;
    airflow)
        shift
        ;;
esac

exec airflow "$@"
