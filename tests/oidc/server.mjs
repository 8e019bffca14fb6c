// A real, standards-conformant authorization server for the client-authentication tests:
// node-oidc-provider (OpenID Certified) does the client authentication itself (private_key_jwt,
// client_secret_jwt, tls_client_auth, self_signed_tls_client_auth, secrets), verifying assertions
// with the `jose` library, not tokengate's code. Beside it runs the "upstream": an API that
// accepts a request only when the provider's introspection endpoint says its token is active.
//
// The jwt-bearer (RFC 7523) and token-exchange (RFC 8693) grants are not built into
// oidc-provider; they are registered here with its grant-type API and verify their assertion
// or subject token with `jose` against the keys the test names.
//
//   node tests/oidc/server.mjs CONFIG.json
//
// CONFIG: { cert, key, ca, clients: [metadata + optional jwks_pem / x5c_pem / kid],
//           jwt_bearer_keys: [pem], subject_keys: [pem], ttl }
// Prints one line `READY {"issuer": ..., "api": ...}` when both listen.

import { readFileSync } from 'node:fs';
import * as crypto from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import Provider, { errors } from 'oidc-provider';
import * as jose from 'jose';

const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const ca = readFileSync(cfg.ca);

// The public JWK of a PEM key or certificate, derived by node's crypto, with its RFC 7638
// thumbprint as kid unless the test names one.
async function jwkOf(pemPath, { kid, x5c } = {}) {
  const pem = readFileSync(pemPath, 'utf8');
  let key;
  let chain;
  if (pem.includes('CERTIFICATE')) {
    const cert = new crypto.X509Certificate(pem);
    key = cert.publicKey;
    chain = [cert.raw.toString('base64')];
  } else {
    key = crypto.createPublicKey(pem);
  }
  const jwk = key.export({ format: 'jwk' });
  jwk.kid = kid ?? await jose.calculateJwkThumbprint(jwk, 'sha256');
  if (x5c && chain) jwk.x5c = chain;
  return jwk;
}

const clients = [];
for (const c of cfg.clients) {
  const { jwks_pem: jwksPem, x5c_pem: x5cPem, kid, ...metadata } = c;
  if (jwksPem) {
    metadata.jwks = { keys: await Promise.all(jwksPem.map((p) => jwkOf(p, { kid }))) };
  }
  if (x5cPem) {
    metadata.jwks = { keys: [await jwkOf(x5cPem, { x5c: true })] };
  }
  clients.push({ grant_types: ['client_credentials'], response_types: [], redirect_uris: [], ...metadata });
}
const keySet = async (paths) => {
  const keys = await Promise.all((paths ?? []).map((p) => jwkOf(p)));
  return jose.createLocalJWKSet({ keys });
};
const bearerKeys = await keySet(cfg.jwt_bearer_keys);
const subjectKeys = await keySet(cfg.subject_keys);

let app = (req, res) => { res.statusCode = 503; res.end(); };
const idp = https.createServer(
  { cert: readFileSync(cfg.cert), key: readFileSync(cfg.key), ca, requestCert: true, rejectUnauthorized: false },
  (req, res) => app(req, res),
);
await new Promise((resolve) => idp.listen(0, '127.0.0.1', resolve));
const issuer = `https://127.0.0.1:${idp.address().port}`;

const peerCertificate = (ctx) => {
  const c = ctx.req.socket.getPeerCertificate(false);
  return c && c.raw ? new crypto.X509Certificate(c.raw) : undefined;
};

// The subject (and, for an exchange with an actor token, the actor) a custom grant established,
// handed to the token as extra claims (oidc-provider sets a token's extra claims from
// extraTokenClaims when it is saved, and introspection returns them).
const subjects = new WeakMap();

const provider = new Provider(issuer, {
  clients,
  extraTokenClaims: (ctx, token) => subjects.get(token),
  clientAuthMethods: [
    'none', 'client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt',
    'tls_client_auth', 'self_signed_tls_client_auth',
  ],
  scopes: ['api:read'],
  ttl: { ClientCredentials: cfg.ttl ?? 600 },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    mTLS: {
      enabled: true,
      tlsClientAuth: true,
      selfSignedTlsClientAuth: true,
      getCertificate: peerCertificate,
      certificateAuthorized: (ctx) => ctx.req.socket.authorized,
      certificateSubjectMatches: (ctx, property, expected) => {
        const cert = peerCertificate(ctx);
        if (property !== 'tls_client_auth_san_dns' || !cert) return false;
        return (cert.subjectAltName ?? '').split(', ').includes(`DNS:${expected}`);
      },
    },
  },
});

const tokenEndpoint = `${issuer}/token`;

async function issue(ctx, sub, extra = {}, act = undefined) {
  const token = new provider.ClientCredentials({ client: ctx.oidc.client, scope: 'api:read' });
  subjects.set(token, act ? { sub, act } : { sub });
  const value = await token.save();
  ctx.body = { access_token: value, token_type: 'Bearer', expires_in: token.expiration, scope: 'api:read', ...extra };
}

async function verified(jwt, keys, what, options = {}) {
  try {
    return (await jose.jwtVerify(jwt, keys, { audience: [issuer, tokenEndpoint], ...options })).payload;
  } catch (e) {
    throw new errors.InvalidGrant(`${what} rejected: ${e.message}`);
  }
}

provider.registerGrantType('urn:ietf:params:oauth:grant-type:jwt-bearer', async (ctx) => {
  const { assertion } = ctx.oidc.params;
  if (!assertion) throw new errors.InvalidRequest('missing assertion');
  const claims = await verified(assertion, bearerKeys, 'assertion', { issuer: ctx.oidc.client.clientId });
  if (!claims.exp || !claims.jti) throw new errors.InvalidGrant('assertion needs exp and jti');
  await issue(ctx, claims.sub);
}, ['assertion', 'scope']);

provider.registerGrantType('urn:ietf:params:oauth:grant-type:token-exchange', async (ctx) => {
  const p = ctx.oidc.params;
  if (!p.subject_token || !p.subject_token_type) throw new errors.InvalidRequest('missing subject_token or subject_token_type');
  if (p.subject_token_type !== 'urn:ietf:params:oauth:token-type:jwt') {
    throw new errors.InvalidRequest(`unsupported subject_token_type ${p.subject_token_type}`);
  }
  const claims = await verified(p.subject_token, subjectKeys, 'subject_token', { audience: undefined });
  if (p.audience !== 'https://api.example') throw new errors.InvalidTarget(`unexpected audience ${p.audience}`);
  // RFC 8693 section 4.1: the actor is named in `act`; here the client whose token was sent.
  let act;
  if (p.actor_token) {
    const actor = await provider.ClientCredentials.find(p.actor_token);
    if (!actor) throw new errors.InvalidGrant('actor_token is not an active token of this server');
    act = { sub: actor.clientId };
  }
  await issue(ctx, claims.sub, { issued_token_type: 'urn:ietf:params:oauth:token-type:access_token' }, act);
}, ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_token_type', 'audience', 'resource', 'scope']);

provider.on('grant.error', (ctx, err) => console.error(`grant error: ${err.message} ${err.error_description ?? ''}`));
app = provider.callback();

// The upstream: introspects each bearer token at the provider, as a resource server would.
const rs = cfg.clients.find((c) => c.client_id === 'resource-server');
function introspect(token) {
  return new Promise((resolve, reject) => {
    const body = new URLSearchParams({ token }).toString();
    const req = https.request(`${issuer}/token/introspection`, {
      method: 'POST',
      ca,
      headers: {
        'content-type': 'application/x-www-form-urlencoded',
        authorization: `Basic ${Buffer.from(`${rs.client_id}:${rs.client_secret}`).toString('base64')}`,
      },
    }, (res) => {
      let data = '';
      res.on('data', (c) => { data += c; });
      res.on('end', () => { try { resolve(JSON.parse(data)); } catch (e) { reject(e); } });
    });
    req.on('error', reject);
    req.end(body);
  });
}

const api = http.createServer(async (req, res) => {
  const auth = req.headers.authorization ?? '';
  const send = (status, value) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(value));
  };
  if (!auth.startsWith('Bearer ')) return send(401, { error: 'no bearer token', authorization: auth });
  try {
    const info = await introspect(auth.slice(7));
    if (!info.active) return send(401, { error: 'token not active' });
    return send(200, { active: true, client_id: info.client_id, scope: info.scope, sub: info.sub, act: info.act, path: req.url });
  } catch (e) {
    return send(502, { error: `introspection failed: ${e.message}` });
  }
});
await new Promise((resolve) => api.listen(0, '127.0.0.1', resolve));
console.log(`READY ${JSON.stringify({ issuer, api: `http://127.0.0.1:${api.address().port}` })}`);
