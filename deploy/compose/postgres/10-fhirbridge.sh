#!/usr/bin/env bash
# Run once by the postgres image's entrypoint on an empty data directory (docker-entrypoint-initdb.d):
# the `fhirbridge` role and the `fhirbridge_backup` replication role (pg_basebackup), their passwords
# read from Compose secrets (never environment values), and one database per store.
set -euo pipefail
app_password="$(cat /run/secrets/pg-fhirbridge-password)"
backup_password="$(cat /run/secrets/pg-backup-password)"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     --set=app_pw="$app_password" --set=backup_pw="$backup_password" <<'SQL'
CREATE ROLE fhirbridge LOGIN PASSWORD :'app_pw';
CREATE ROLE fhirbridge_backup LOGIN REPLICATION PASSWORD :'backup_pw';
CREATE DATABASE ledger OWNER fhirbridge;
CREATE DATABASE resource_index OWNER fhirbridge;
CREATE DATABASE mpi OWNER fhirbridge;
CREATE DATABASE audit OWNER fhirbridge;
CREATE DATABASE audit_log OWNER fhirbridge;
CREATE DATABASE auth OWNER fhirbridge;
CREATE DATABASE exports OWNER fhirbridge;
SQL
