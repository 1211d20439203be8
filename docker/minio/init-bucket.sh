#!/bin/sh
# One-shot MinIO setup, run by the minio-init service (minio/mc image) once minio is healthy:
#   - the platform bucket ${BUCKET}, private (no anonymous access);
#   - a platform user ${S3_ACCESS_KEY} whose policy allows that bucket and nothing else, so the
#     Airflow services never hold the MinIO root credentials.
# Idempotent: safe on every `docker compose up`.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${BUCKET:?}"
: "${S3_ACCESS_KEY:?}" "${S3_SECRET_KEY:?}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"
POLICY="${BUCKET}-readwrite"

mc alias set local "${MINIO_URL}" "${MINIO_ROOT_USER}" "${MINIO_ROOT_PASSWORD}" >/dev/null

mc mb --ignore-existing "local/${BUCKET}"
mc anonymous set none "local/${BUCKET}"

cat >/tmp/policy.json <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::${BUCKET}"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
                 "s3:GetObjectTagging", "s3:PutObjectTagging"],
      "Resource": ["arn:aws:s3:::${BUCKET}/*"]
    }
  ]
}
JSON
mc admin policy create local "${POLICY}" /tmp/policy.json
mc admin user add local "${S3_ACCESS_KEY}" "${S3_SECRET_KEY}"
# `attach` fails when the policy is already attached (a re-run); anything else is a real error.
if ! out=$(mc admin policy attach local "${POLICY}" --user "${S3_ACCESS_KEY}" 2>&1); then
    case "${out}" in
        *"already"*) echo "policy ${POLICY} already attached to ${S3_ACCESS_KEY}" ;;
        *) echo "${out}" >&2; exit 1 ;;
    esac
fi
echo "minio-init: bucket ${BUCKET} (private), user ${S3_ACCESS_KEY} with policy ${POLICY}"
