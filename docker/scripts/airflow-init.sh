#!/usr/bin/env bash
# One-shot initialisation run by the airflow-init service (as root, like the official compose file):
#   1. create the shared folders and hand them to ${AIRFLOW_UID}:0;
#   2. write the simple auth manager's passwords file from .env, so the UI/API login is the
#      password you chose, not one generated and printed to the api-server log;
#   3. `airflow db migrate` on the metadata database;
#   4. the pool GPU tasks run in (MMPRM_ORCHESTRATION__GPU_POOL, the name the DAGs read).
set -euo pipefail

: "${AIRFLOW_UID:?AIRFLOW_UID must be set (see .env.example)}"
: "${AIRFLOW_ADMIN_USERNAME:?}" "${AIRFLOW_ADMIN_PASSWORD:?}"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}"
: "${MMPRM_ORCHESTRATION__GPU_POOL:?}" "${MMPRM_ORCHESTRATION__GPU_POOL_SLOTS:?}"
AIRFLOW_HOME="${AIRFLOW_HOME:-/opt/airflow}"
# The official image's entrypoint (waits for the database, then runs `airflow ...`); overridable
# so tests can run this script against a local Airflow.
ENTRYPOINT="${AIRFLOW_INIT_ENTRYPOINT:-/entrypoint}"

mkdir -p "${AIRFLOW_HOME}"/{logs,config}

passwords_file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE}"
mkdir -p "$(dirname "${passwords_file}")"
# The passwords JSON is {"user": "password"}; json.dumps quotes any character correctly.
python - "${passwords_file}" <<'PY'
import json, os, sys
path = sys.argv[1]
passwords = {os.environ["AIRFLOW_ADMIN_USERNAME"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}
with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
    f.write(json.dumps(passwords) + "\n")
PY
echo "airflow-init: wrote ${passwords_file} for user ${AIRFLOW_ADMIN_USERNAME}"

echo "airflow-init: airflow db migrate"
"${ENTRYPOINT}" airflow db migrate

echo "airflow-init: pool ${MMPRM_ORCHESTRATION__GPU_POOL} (${MMPRM_ORCHESTRATION__GPU_POOL_SLOTS} slots)"
"${ENTRYPOINT}" airflow pools set "${MMPRM_ORCHESTRATION__GPU_POOL}" "${MMPRM_ORCHESTRATION__GPU_POOL_SLOTS}" \
    "GPU slots for annotation, training and evaluation"

# Last, so whatever the migration wrote is owned by the uid the services run as. dags/ is left
# alone: it is bind-mounted from the host and the services only read it.
chown -R "${AIRFLOW_UID}:0" "${AIRFLOW_HOME}"/{logs,config}
chmod 0600 "${passwords_file}"
"${ENTRYPOINT}" airflow version
