// An external OpenID Connect issuer for fhirbridge's interoperability test (tests/integration/
// test_oidc_interop.py): oidc-provider, configured as a hospital's identity provider would be for
// SMART Backend Services, on http://127.0.0.1:$OIDC_PORT. Started and stopped by tests/services/oidc.py.
//
//   node provider.mjs <state dir>
//
// Environment: OIDC_PORT (the loopback port), OIDC_FHIR_BASE (fhirbridge's FHIR base: the resource
// indicator, and so the audience, of the tokens fhirbridge must accept), OIDC_OTHER_RESOURCE (another
// resource server, whose tokens fhirbridge must refuse).
//
// The state dir holds clients.json ({"<client id>": "<secret>"} for backend-jwt, backend-opaque and
// fhirbridge) and jwks.json (the issuer's private signing keys). Client credentials with
// client_secret_basic and resource=<FHIR base> give a JWT access token (RFC 9068) to backend-jwt and
// an opaque one to backend-opaque; fhirbridge (the resource server) may introspect (RFC 7662).
//
// Key rotation as oidc-provider documents it (configuration option `jwks`): the keys are replaced in
// jwks.json (the first one signs, the others are published for verification), and then the process
// "reloads": on SIGHUP this program reads jwks.json again and swaps in a new Provider built on it,
// on the same port, with the same issuer, clients and issued tokens (SharedMemoryAdapter below). A
// jwks.json that cannot be used leaves the running keys in place.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`provider.mjs: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const stateDir = process.argv[2];
if (!stateDir) {
  console.error('usage: node provider.mjs <state dir>');
  process.exit(2);
}
const port = Number(required('OIDC_PORT'));
const fhirBase = required('OIDC_FHIR_BASE');
const otherResource = required('OIDC_OTHER_RESOURCE');
const issuer = `http://127.0.0.1:${port}`;

// the SMART scopes this issuer grants (one it knows but a client is not registered with is refused
// with invalid_scope; a token for a resource server carries only that server's scopes)
const SMART_SCOPES = ['system/*.rs', 'system/Patient.rs', 'user/Person.u'];
// the access token format each backend service gets for a resource server
const TOKEN_FORMAT = { 'backend-jwt': 'jwt', 'backend-opaque': 'opaque' };

const secrets = JSON.parse(readFileSync(join(stateDir, 'clients.json'), 'utf8'));
const clients = [
  ...Object.keys(TOKEN_FORMAT).map((clientId) => ({
    client_id: clientId,
    client_secret: secrets[clientId],
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: SMART_SCOPES.join(' '),
  })),
  {
    // the resource server: it asks about opaque tokens, and gets none itself
    client_id: 'fhirbridge',
    client_secret: secrets.fhirbridge,
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: [],
    response_types: [],
    redirect_uris: [],
  },
];
const cookieKeys = [randomBytes(32).toString('base64url')];

// oidc-provider keeps opaque tokens through an adapter. Its default in-memory store belongs to one
// Provider object, so a reload would forget every token issued before it; this one is the process's.
// (Expiry is oidc-provider's own check on what `find` returns; a test's process lives minutes.)
const store = new Map();
class SharedMemoryAdapter {
  constructor(model) { this.model = model; }
  key(id) { return `${this.model}:${id}`; }
  async upsert(id, payload) { store.set(this.key(id), payload); }
  async find(id) { return store.get(this.key(id)); }
  async findByUid() { return undefined; } // no sign-in sessions: client credentials only
  async findByUserCode() { return undefined; }
  async consume(id) {
    const payload = store.get(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }
  async destroy(id) { store.delete(this.key(id)); }
  async revokeByGrantId() {} // client credentials tokens belong to no grant
}

function configuration(jwks) {
  return {
    adapter: SharedMemoryAdapter,
    clients,
    jwks,
    scopes: ['openid', ...SMART_SCOPES],
    cookies: { keys: cookieKeys },
    // an hour, as identity providers commonly issue them (the resource server's setting, else 10 min)
    ttl: { ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 600 },
    // the purpose of use, as IHE IUA puts it in a token (and in the introspection answer of an
    // opaque one): a system/ token that states none reads no patient data at fhirbridge
    extraTokenClaims: async () => ({
      extensions: {
        ihe_iua: {
          purpose_of_use: [{ system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'TREAT' }],
        },
      },
    }),
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        // only the resource server may ask, and it may ask about any client's token
        allowedPolicy: async (ctx, client) => client.clientId === 'fhirbridge',
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => undefined, // a token request names its resource server
        useGrantedResource: async () => false,
        getResourceServerInfo: async (ctx, resource, client) => {
          if (resource !== fhirBase && resource !== otherResource) {
            throw new errors.InvalidTarget();
          }
          const accessTokenFormat = TOKEN_FORMAT[client.clientId];
          if (!accessTokenFormat) {
            throw new errors.InvalidTarget();
          }
          return {
            scope: SMART_SCOPES.join(' '),
            audience: resource,
            accessTokenTTL: 3600,
            accessTokenFormat,
            ...(accessTokenFormat === 'jwt' ? { jwt: { sign: { alg: 'RS256' } } } : {}),
          };
        },
      },
    },
  };
}

function build() {
  const jwks = JSON.parse(readFileSync(join(stateDir, 'jwks.json'), 'utf8'));
  const provider = new Provider(issuer, configuration(jwks));
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  return { handler: provider.callback(), kids: jwks.keys.map((k) => k.kid) };
}

let current = build();

process.on('SIGHUP', () => {
  try {
    current = build();
    console.log(JSON.stringify({ event: 'keys_reloaded', kids: current.kids }));
  } catch (err) {
    console.error(JSON.stringify({ event: 'keys_reload_failed', error: String(err) }));
  }
});

const server = http.createServer((req, res) => current.handler(req, res));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
server.on('error', (err) => {
  console.error(JSON.stringify({ event: 'listen_failed', code: err.code, error: String(err) }));
  process.exit(3);
});
server.listen(port, '127.0.0.1', () => {
  console.log(JSON.stringify({ event: 'listening', issuer, kids: current.kids }));
});
