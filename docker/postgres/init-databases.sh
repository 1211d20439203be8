#!/usr/bin/env bash
# Creates the two databases of the stack and their owners, each reachable only by its owner:
#   ${AIRFLOW_DB_NAME}     owned by ${AIRFLOW_DB_USER}      (Airflow metadata; `airflow db migrate`)
#   ${STEP_INDEX_DB_NAME}  owned by ${STEP_INDEX_DB_USER}   (MM-PRM step index; `mmprm db upgrade`)
#
# The postgres image runs it once, from /docker-entrypoint-initdb.d, when the data volume is new.
# It is idempotent, so on an existing volume it can be run by hand:
#   docker compose exec postgres bash /docker-entrypoint-initdb.d/10-init-databases.sh
# The tables are not created here: the step-index schema is the versioned migrations in sql/,
# applied by the mmprm-db-migrate service (`mmprm db upgrade`), which records each version.
set -euo pipefail

: "${AIRFLOW_DB_NAME:?}" "${AIRFLOW_DB_USER:?}" "${AIRFLOW_DB_PASSWORD:?}"
: "${STEP_INDEX_DB_NAME:?}" "${STEP_INDEX_DB_USER:?}" "${STEP_INDEX_DB_PASSWORD:?}"

create_database() {
    # Names and passwords go through psql variables (:"ident", :'literal') and format(%I, %L), so
    # any value is quoted correctly; \gexec runs each CREATE only when the object is missing.
    psql -v ON_ERROR_STOP=1 --no-psqlrc \
        --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
        -v db="$1" -v owner="$2" -v password="$3" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'owner', :'password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'owner', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT ALL ON DATABASE :"db" TO :"owner";
SQL
}

create_database "${AIRFLOW_DB_NAME}" "${AIRFLOW_DB_USER}" "${AIRFLOW_DB_PASSWORD}"
create_database "${STEP_INDEX_DB_NAME}" "${STEP_INDEX_DB_USER}" "${STEP_INDEX_DB_PASSWORD}"
echo "init-databases: ${AIRFLOW_DB_NAME} (owner ${AIRFLOW_DB_USER}), ${STEP_INDEX_DB_NAME} (owner ${STEP_INDEX_DB_USER})"
