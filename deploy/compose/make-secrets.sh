#!/usr/bin/env bash
# Make every secret compose.yaml names, under deploy/compose/secrets/ (git-ignored): a private CA,
# TLS certificates for the brokers, PostgreSQL, serve and mllp, one Kafka client certificate, random
# database passwords and the pgpass file, and fhirbridge's own keys (ledger, audit log, witness, an
# organisation's envelope signing key with its trust registry, the authorization server's key ring),
# the last ones made by the fhirbridge image itself. Existing files are kept: delete one to renew it
# (docs/deploy.md#key-rotation). Run as root (or with sudo) so that each file can be given to the
# account that reads it: fhirbridge 10001, Kafka (apache/kafka's appuser) 1000, postgres 999.
set -euo pipefail
cd "$(dirname "$0")/secrets"
IMAGE="${FHIRBRIDGE_IMAGE:-fhirbridge:0.1.0}"
ORG="${FHIRBRIDGE_MLLP_SOURCE:-st-mary}"
DAYS="${CERT_DAYS:-397}"

[ -f ca.key ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=fhirbridge compose CA" -keyout ca.key -out ca.crt

cert() {  # cert NAME SAN [clientAuth]: NAME.key (PKCS#8, unencrypted) and NAME.crt signed by the CA
  local name="$1" san="$2" usage="${3:-serverAuth,clientAuth}"
  [ -f "$name.crt" ] && return 0
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
      -keyout "$name.key" -out "$name.csr"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" \
      -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$san" "$usage") -out "$name.crt"
  rm -f "$name.csr"
}
for n in 1 2 3; do
  cert "kafka-$n" "DNS:kafka-$n"
  cat "kafka-$n.key" "kafka-$n.crt" > "kafka-$n.pem"   # a PEM keystore: key, then certificate
done
cert postgres "DNS:postgres" serverAuth
cert serve "DNS:serve,DNS:localhost,IP:127.0.0.1" serverAuth
cert mllp "DNS:mllp,DNS:localhost,IP:127.0.0.1" serverAuth
cert kafka-client "DNS:fhirbridge-client" clientAuth

pw() { [ -f "$1" ] || openssl rand -base64 33 | tr -d '/+=\n' > "$1"; }
pw pg-superuser-password
pw pg-fhirbridge-password
pw pg-backup-password
[ -f pgpass ] || printf 'postgres:5432:*:fhirbridge:%s\n' "$(cat pg-fhirbridge-password)" > pgpass

# fhirbridge's keys, made by the image (the same code that reads them)
run() { docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/work:/work" -e FHIRBRIDGE_DATA_DIR=/work "$IMAGE" "$@"; }
mkdir -p work
if [ ! -f ledger.key ]; then
  run ledger keygen --name "${FHIRBRIDGE_LEDGER_ORIGIN:-fhirbridge.example/ledger}" --out /work/ledger
  mv work/ledger/*.key ledger.key && mv work/ledger/*.pub ledger.pub
fi
if [ ! -f audit.key ]; then
  run ledger keygen --name "${FHIRBRIDGE_LEDGER_ORIGIN:-fhirbridge.example/ledger}/audit" --out /work/audit
  mv work/audit/*.key audit.key && mv work/audit/*.pub audit.pub
fi
if [ ! -f witness.key ]; then
  run ledger keygen --witness --name witness-compose --out /work/witness
  mv work/witness/*.key witness.key && mv work/witness/*.pub witness.pub
fi
if [ ! -f org-signing.key ]; then
  run keys create --org "$ORG"
  mv "work/keys/$ORG.key" org-signing.key && mv work/trust.json trust.json
fi
if [ ! -f auth-signing.json ]; then
  run auth rotate-key
  mv work/auth/keys/signing.json auth-signing.json
fi
[ -f issuers.toml ] || printf '# token issuers trusted besides the embedded one (docs/auth.md)\n' > issuers.toml
rm -rf work

chmod 0444 ca.crt ./*.crt ledger.pub audit.pub witness.pub trust.json issuers.toml
chmod 0400 ./*.key ./*.pem pgpass auth-signing.json pg-*-password
if [ "$(id -u)" = 0 ]; then
  chown 1000:1000 kafka-?.pem
  chown 999:999 postgres.key pg-superuser-password pg-fhirbridge-password pg-backup-password
  chown 10001:10001 kafka-client.key serve.key mllp.key pgpass ledger.key audit.key witness.key \
      org-signing.key auth-signing.json
else
  echo "not root: give kafka-?.pem to uid 1000, postgres.key and pg-*-password to uid 999, the other" \
       "private files to uid 10001 (docs/deploy.md#compose)" >&2
fi
chmod 0400 ca.key
echo "secrets ready in $PWD"
