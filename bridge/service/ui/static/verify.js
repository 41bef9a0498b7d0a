/* fhirbridge: "Verify" on the patient page (docs/ui.md, Verification). Vanilla JavaScript, no build step.
 *
 * The browser itself checks, with WebCrypto (SHA-256, Ed25519):
 *  - each delivery's RFC 9162 inclusion proof: leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || l || r),
 *    the audit path up to the root of the signed checkpoint;
 *  - the checkpoint (a C2SP signed note): the ledger's Ed25519 signature over the note text, under the key id
 *    SHA-256(name || 0x0A || 0x01 || key)[:4], and the cosignatures of the configured witnesses
 *    (tlog-cosignature/v1: u64 time || Ed25519("cosignature/v1\ntime <t>\n" || note text), key id with 0x04);
 *  - that the checkpoint extends the last one this browser saw (kept in localStorage: the note only),
 *    with GET /ledger/proof/consistency.
 * The trusted keys come from the service's configuration (GET /app/Patient/{id}/proofs), never from the
 * checkpoint. Anything that cannot be checked is reported, never passed silently.
 */
(function () {
  "use strict";

  var STORE_PREFIX = "fhirbridge.ledger.checkpoint:";
  var ALG_ED25519 = 1;
  var ALG_COSIGNATURE = 4;
  var PENDING_TEXT = "pending (logged after the latest checkpoint)";
  var UNLOGGED_TEXT = "not in the ledger";
  var RANK = { verified: 0, pending: 1, unlogged: 2, unchecked: 3, failed: 4 };
  var utf8 = new TextEncoder();

  function Failure(reason) {
    this.reason = reason;
  }
  function Unsupported(reason) {
    this.reason = reason;
  }
  function fail(reason) {
    throw new Failure(reason);
  }
  function reasonOf(e) {
    if (e instanceof Failure || e instanceof Unsupported) return e.reason;
    return "unexpected error: " + (e && e.message ? e.message : String(e));
  }

  // ---------------------------------------------------------------- bytes
  function b64decode(text, what) {
    if (typeof text !== "string" || text.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) {
      fail(what + " is not base64");
    }
    var bin;
    try {
      bin = atob(text);
    } catch (e) {
      fail(what + " is not base64");
    }
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function hex(bytes) {
    return Array.prototype.map.call(bytes, function (b) { return (b < 16 ? "0" : "") + b.toString(16); }).join("");
  }
  function concat() {
    var n = 0, i;
    for (i = 0; i < arguments.length; i++) n += arguments[i].length;
    var out = new Uint8Array(n), pos = 0;
    for (i = 0; i < arguments.length; i++) {
      out.set(arguments[i], pos);
      pos += arguments[i].length;
    }
    return out;
  }
  function equal(a, b) {
    if (a.length !== b.length) return false;
    var d = 0;
    for (var i = 0; i < a.length; i++) d |= a[i] ^ b[i];
    return d === 0;
  }
  async function sha256(bytes) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  }
  function leafHash(entry) {
    return sha256(concat(Uint8Array.of(0), entry));
  }
  function nodeHash(l, r) {
    return sha256(concat(Uint8Array.of(1), l, r));
  }
  function hash32(text, what) {
    var h = b64decode(text, what);
    if (h.length !== 32) fail(what + " is not a 32-byte hash");
    return h;
  }
  function toSize(value, what) {
    if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) fail(what + " is not a valid size");
    return BigInt(value);
  }

  // ---------------------------------------------------------------- RFC 9162 (transparency-dev proof/verify.go)
  function bitLength(n) {
    return n === 0n ? 0 : n.toString(2).length;
  }
  function onesCount(n) {
    return n.toString(2).split("1").length - 1;
  }
  function decompose(index, size) {
    var inner = bitLength(index ^ (size - 1n));
    var border = onesCount(index >> BigInt(inner));
    return [inner, border];
  }
  async function chainInner(seed, proof, index) {
    for (var i = 0; i < proof.length; i++) {
      seed = ((index >> BigInt(i)) & 1n) === 0n ? await nodeHash(seed, proof[i]) : await nodeHash(proof[i], seed);
    }
    return seed;
  }
  async function chainInnerRight(seed, proof, index) {
    for (var i = 0; i < proof.length; i++) {
      if (((index >> BigInt(i)) & 1n) === 1n) seed = await nodeHash(proof[i], seed);
    }
    return seed;
  }
  async function chainBorderRight(seed, proof) {
    for (var i = 0; i < proof.length; i++) seed = await nodeHash(proof[i], seed);
    return seed;
  }
  async function rootFromInclusion(leaf, index, size, proof) {
    if (index >= size) fail("index " + index + " is not below the tree size " + size);
    var d = decompose(index, size);
    if (proof.length !== d[0] + d[1]) fail("the inclusion proof has " + proof.length + " hashes, not " + (d[0] + d[1]));
    var res = await chainInner(leaf, proof.slice(0, d[0]), index);
    return chainBorderRight(res, proof.slice(d[0]));
  }
  async function verifyConsistency(size1, size2, proof, root1, root2) {
    if (size2 < size1) fail("size " + size2 + " is smaller than " + size1);
    if (size1 === size2) {
      if (proof.length) fail("a non-empty proof between equal sizes");
      if (!equal(root1, root2)) fail("two different roots for size " + size1);
      return;
    }
    if (size1 === 0n) return; // the empty tree is a prefix of every tree
    if (!proof.length) fail("an empty consistency proof");
    var d = decompose(size1 - 1n, size2);
    var inner = d[0], border = d[1];
    var shift = bitLength(size1 & -size1) - 1;
    inner -= shift;
    var seed, start;
    if (size1 === 1n << BigInt(shift)) {
      seed = root1;
      start = 0;
    } else {
      seed = proof[0];
      start = 1;
    }
    if (proof.length !== start + inner + border) fail("the consistency proof has the wrong number of hashes");
    var rest = proof.slice(start);
    var mask = (size1 - 1n) >> BigInt(shift);
    var h1 = await chainBorderRight(await chainInnerRight(seed, rest.slice(0, inner), mask), rest.slice(inner));
    if (!equal(h1, root1)) fail("the consistency proof does not match the older root");
    var h2 = await chainBorderRight(await chainInner(seed, rest.slice(0, inner), mask), rest.slice(inner));
    if (!equal(h2, root2)) fail("the consistency proof does not match the newer root");
  }

  // ---------------------------------------------------------------- C2SP signed notes
  async function keyId(name, alg, pub) {
    return (await sha256(concat(utf8.encode(name + "\n"), Uint8Array.of(alg), pub))).slice(0, 4);
  }
  async function importEd25519(pub) {
    try {
      return await crypto.subtle.importKey("raw", pub, { name: "Ed25519" }, false, ["verify"]);
    } catch (e) {
      if (e && (e.name === "NotSupportedError" || e.name === "TypeError")) {
        throw new Unsupported("this browser's WebCrypto does not support Ed25519 signatures");
      }
      throw new Failure("the Ed25519 key cannot be imported: " + (e && e.name));
    }
  }
  async function ed25519Verify(key, sig, msg) {
    try {
      return await crypto.subtle.verify({ name: "Ed25519" }, key, sig, msg);
    } catch (e) {
      if (e && e.name === "NotSupportedError") {
        throw new Unsupported("this browser's WebCrypto does not support Ed25519 signatures");
      }
      return false;
    }
  }
  /** A verifier key "<name>+<hex id>+<base64(alg || key)>" of algorithm ``alg``, its id checked. */
  async function parseKey(text, alg, what) {
    var m = typeof text === "string" ? /^([^+]+)\+([^+]*)\+(.*)$/.exec(text) : null; // the base64 may hold '+'
    var parts = m ? m.slice(1) : [];
    if (parts.length !== 3 || !parts[0] || !/^[0-9a-f]{8}$/.test(parts[1])) fail(what + " is malformed");
    var raw = b64decode(parts[2], what);
    if (raw.length !== 33 || raw[0] !== alg) fail(what + " is not an Ed25519 key of the expected kind");
    var pub = raw.slice(1);
    var id = await keyId(parts[0], alg, pub);
    if (hex(id) !== parts[1]) fail(what + ": its key id does not match the key");
    return { name: parts[0], id: hex(id), alg: alg, pub: pub, text: text, key: await importEd25519(pub) };
  }
  function parseNote(note) {
    if (typeof note !== "string" || /[\u0000-\u0009\u000b-\u001f]/.test(note)) fail("the checkpoint is not a note");
    var split = note.lastIndexOf("\n\n");
    if (split < 0) fail("the checkpoint has no signature block");
    var text = note.slice(0, split + 1), block = note.slice(split + 2);
    if (!block || block.charAt(block.length - 1) !== "\n") fail("the checkpoint's signature block is malformed");
    var sigs = block.slice(0, -1).split("\n").map(function (line) {
      var m = /^\u2014 ([^ +]+) ([A-Za-z0-9+/=]+)$/.exec(line);
      if (!m) fail("a signature line of the checkpoint is malformed");
      var raw = b64decode(m[2], "a checkpoint signature");
      if (raw.length < 5) fail("a signature line of the checkpoint is malformed");
      return { name: m[1], id: hex(raw.slice(0, 4)), sig: raw.slice(4) };
    });
    return { text: text, sigs: sigs };
  }
  function parseBody(text) {
    var lines = text.slice(0, -1).split("\n");
    if (lines.length < 3 || !lines[0]) fail("the checkpoint body is malformed");
    if (!/^(0|[1-9][0-9]*)$/.test(lines[1]) || BigInt(lines[1]) >= 1n << 64n) fail("the checkpoint size is malformed");
    return { origin: lines[0], size: BigInt(lines[1]), root: hash32(lines[2], "the checkpoint root") };
  }
  /** Verify a checkpoint note: the ledger key must have signed it, each configured witness's cosignature
   * present must verify; other signatures are counted and ignored (Go's note.Open). */
  async function openCheckpoint(note, logKey, witnesses, origin) {
    var parsed = parseNote(note);
    var text = utf8.encode(parsed.text);
    var signed = false, cosigners = [], ignored = 0, seen = {};
    for (var i = 0; i < parsed.sigs.length; i++) {
      var s = parsed.sigs[i], tag = s.name + "+" + s.id;
      if (seen[tag]) continue;
      seen[tag] = true;
      if (s.name === logKey.name && s.id === logKey.id) {
        if (!(await ed25519Verify(logKey.key, s.sig, text))) fail("the checkpoint's signature by the ledger key does not verify");
        signed = true;
        continue;
      }
      var w = witnesses.filter(function (k) { return k.name === s.name && k.id === s.id; })[0];
      if (!w) {
        ignored++;
        continue;
      }
      if (s.sig.length !== 72) fail("witness " + w.name + "'s cosignature is malformed");
      var time = new DataView(s.sig.buffer, s.sig.byteOffset, 8).getBigUint64(0);
      if (time >= 1n << 63n) fail("witness " + w.name + "'s cosignature has an invalid time");
      var msg = concat(utf8.encode("cosignature/v1\ntime " + time.toString() + "\n"), text);
      if (!(await ed25519Verify(w.key, s.sig.slice(8), msg))) fail("witness " + w.name + "'s cosignature does not verify");
      cosigners.push(w.name);
    }
    if (!signed) fail("the checkpoint is not signed by the ledger key this service names");
    var body = parseBody(parsed.text);
    if (body.origin !== origin) fail("the checkpoint is for the log " + JSON.stringify(body.origin) + ", not " + JSON.stringify(origin));
    body.note = note;
    body.cosigners = cosigners;
    body.ignored = ignored;
    return body;
  }

  // ---------------------------------------------------------------- fetching
  async function getJSON(url, what) {
    var resp;
    try {
      resp = await fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } });
    } catch (e) {
      fail("could not read " + what + ": network error");
    }
    var body = null;
    try {
      body = await resp.json();
    } catch (e) {
      body = null;
    }
    if (!resp.ok) {
      var why = body && (body.error || (body.issue && body.issue[0] && body.issue[0].diagnostics));
      fail("could not read " + what + ": HTTP " + resp.status + (why ? " (" + why + ")" : ""));
    }
    if (!body || typeof body !== "object") fail(what + " is not JSON");
    return body;
  }
  async function consistent(older, newer, what) {
    if (older.size === 0n || older.size === newer.size) {
      return verifyConsistency(older.size, newer.size, [], older.root, newer.root);
    }
    var body = await getJSON("/ledger/proof/consistency?from=" + older.size + "&to=" + newer.size, "the consistency proof " + what);
    if (!Array.isArray(body.proof)) fail("the consistency proof " + what + " is malformed");
    var proof = body.proof.map(function (h) { return hash32(h, "a consistency proof hash"); });
    return verifyConsistency(older.size, newer.size, proof, older.root, newer.root);
  }

  // ---------------------------------------------------------------- the checks
  async function verifyDelivery(d, cps, globalFailure) {
    if (d.ledger_index === null || d.ledger_index === undefined) return { state: "unlogged" };
    var index = toSize(d.ledger_index, "the ledger index");
    var hasProof = "tree_size" in d || "ledger_entry" in d || "proof" in d;
    var cp = typeof d.checkpoint === "number" ? cps[d.checkpoint] : null;
    if (typeof d.checkpoint === "number" && !cp) fail(globalFailure || "the proof names a checkpoint that was not sent");
    if (!cp || index >= cp.size) {
      if (hasProof) fail("a proof was sent for an entry the checkpoint does not cover");
      return { state: "pending" };
    }
    if (!hasProof) fail("no proof was sent although checkpoint " + cp.size + " covers ledger entry " + index);
    if (globalFailure) fail(globalFailure);
    var entry = b64decode(d.ledger_entry, "the ledger entry");
    var leaf = await leafHash(entry);
    if (!equal(leaf, hash32(d.leaf_hash, "the leaf hash"))) fail("the leaf hash does not match the ledger entry");
    var record;
    try {
      record = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(entry));
    } catch (e) {
      fail("the ledger entry is not JSON");
    }
    if (!record || record.bundle_sha256 !== d.bundle_sha256 || record.source_org !== d.source_org) {
      fail("the ledger entry names another bundle than this delivery");
    }
    if (toSize(d.tree_size, "the tree size") !== cp.size) fail("the proof is for tree size " + d.tree_size + ", not the checkpoint's " + cp.size);
    if (!Array.isArray(d.proof)) fail("the inclusion proof is malformed");
    var proof = d.proof.map(function (h) { return hash32(h, "a proof hash"); });
    var root = await rootFromInclusion(leaf, index, cp.size, proof);
    if (!equal(root, cp.root)) fail("the inclusion proof does not lead to the root of checkpoint " + cp.size);
    return { state: "verified", size: cp.size };
  }

  function storage() {
    try {
      return window.localStorage;
    } catch (e) {
      return null;
    }
  }

  /** Everything: returns {checkpoint, cosigned, witnesses, remembered, entries: Map key -> [delivery results]}. */
  async function verifyPage(pid) {
    if (!window.isSecureContext || !window.crypto || !crypto.subtle) {
      throw new Unsupported("this page is not a secure context (HTTPS or this computer), so the browser offers no WebCrypto");
    }
    var data = await getJSON("/app/Patient/" + encodeURIComponent(pid) + "/proofs", "the proofs");
    if (!data.log_key) fail("this service names no ledger key to trust" + (data.key_problems && data.key_problems.length ? ": " + data.key_problems.join("; ") : ""));
    var logKey = await parseKey(data.log_key, ALG_ED25519, "the ledger key");
    var witnesses = [];
    for (var w = 0; w < (data.witness_keys || []).length; w++) {
      witnesses.push(await parseKey(data.witness_keys[w], ALG_COSIGNATURE, "witness key " + (w + 1)));
    }
    var result = { logKey: logKey, witnesses: witnesses, entries: new Map(), failure: null, notices: data.notices || [], truncated: !!data.truncated };
    var cps = [];
    try {
      var bad = null;
      for (var i = 0; i < (data.checkpoints || []).length; i++) {
        try {
          cps.push(await openCheckpoint(data.checkpoints[i], logKey, witnesses, data.origin));
        } catch (e) {
          if (e instanceof Unsupported) throw e;
          bad = bad || e;
          var rough = null; // unverified: only to tell pending entries apart, never to pass one
          try {
            rough = parseBody(parseNote(data.checkpoints[i]).text);
          } catch (x) {
            rough = null;
          }
          cps.push(rough);
        }
      }
      if (bad) throw bad;
      var ordered = cps.slice().sort(function (a, b) { return a.size < b.size ? -1 : a.size > b.size ? 1 : 0; });
      for (var j = 1; j < ordered.length; j++) {
        try {
          await consistent(ordered[j - 1], ordered[j], "between the page's checkpoints");
        } catch (e) {
          fail("the log was rewritten: checkpoint " + ordered[j].size + " does not extend checkpoint " + ordered[j - 1].size + " (" + reasonOf(e) + ")");
        }
      }
      var latest = ordered.length ? ordered[ordered.length - 1] : null;
      result.checkpoint = latest;
      // keyed by this site, not by the origin the server names: a server that renamed its log (and
      // signed with another key) still meets the note remembered here, and fails against it
      var store = storage(), key = STORE_PREFIX + window.location.origin;
      var kept = store ? store.getItem(key) : null;
      if (kept && latest) {
        var old;
        try {
          old = await openCheckpoint(kept, logKey, [], data.origin);
        } catch (e) {
          if (e instanceof Unsupported) throw e;
          fail("the checkpoint this browser remembered is not signed by the ledger key this service now names (" + reasonOf(e) + "): the key changed or the log was replaced");
        }
        result.remembered = old.size;
        var older = old.size <= latest.size ? old : latest, newer = old.size <= latest.size ? latest : old;
        try {
          await consistent(older, newer, "from the remembered checkpoint");
        } catch (e) {
          if (e instanceof Unsupported) throw e;
          fail("the log was rewritten: checkpoint " + latest.size + " is not consistent with checkpoint " + old.size + " seen earlier in this browser (" + reasonOf(e) + ")");
        }
        if (newer === latest && store) store.setItem(key, latest.note);
      } else if (latest && store) {
        store.setItem(key, latest.note); // the checkpoint note only: it holds no patient data
      }
    } catch (e) {
      if (e instanceof Unsupported) throw e;
      result.failure = reasonOf(e);
    }
    for (var k = 0; k < (data.entries || []).length; k++) {
      var entry = data.entries[k], states = [];
      var list = Array.isArray(entry.deliveries) ? entry.deliveries : [];
      for (var n = 0; n < list.length; n++) {
        var st;
        try {
          st = await verifyDelivery(list[n], cps, result.failure);
        } catch (e) {
          if (e instanceof Unsupported) throw e;
          st = { state: "failed", reason: reasonOf(e) };
        }
        st.source = list[n].source_org;
        states.push(st);
      }
      if (!states.length) states.push({ state: "unlogged" });
      result.entries.set(String(entry.key), states);
    }
    return result;
  }

  // ---------------------------------------------------------------- the page
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (a) { node.setAttribute(a, attrs[a]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function phrase(st) {
    if (st.state === "verified") return "verified against checkpoint " + st.size;
    if (st.state === "pending") return PENDING_TEXT;
    if (st.state === "unlogged") return UNLOGGED_TEXT;
    if (st.state === "unchecked") return "not verified (" + st.reason + ")";
    return "FAILED (" + st.reason + ")";
  }
  function worst(states) {
    return states.reduce(function (a, b) { return RANK[b.state] > RANK[a.state] ? b : a; });
  }
  function entryText(states) {
    var distinct = states.map(phrase).filter(function (p, i, all) { return all.indexOf(p) === i; });
    if (distinct.length === 1) return distinct[0];
    return states.map(function (s) { return (s.source || "a source") + ": " + phrase(s); }).join("; ");
  }

  var last = null;

  function annotate() {
    var rows = document.querySelectorAll("tr[data-entry]");
    rows.forEach(function (row) {
      var cell = row.lastElementChild;
      if (!cell) return;
      var old = cell.querySelector(".verify-state");
      if (old) old.remove();
      if (!last) return;
      var states = last.entries.get(row.getAttribute("data-entry")) ||
        [last.fallback || { state: "failed", reason: "the proof material does not include this entry" }];
      var span = el("span", { class: "verify-state", "data-verify-state": worst(states).state });
      span.appendChild(el("br"));
      span.appendChild(document.createTextNode("Ledger: " + entryText(states)));
      cell.appendChild(span);
    });
  }

  function summary(result) {
    var counts = { verified: 0, pending: 0, unlogged: 0, failed: 0 }, firstFailure = null;
    result.entries.forEach(function (states) {
      var w = worst(states);
      counts[w.state]++;
      if (w.state === "failed" && !firstFailure) firstFailure = w.reason;
    });
    var total = result.entries.size, lines = [], headline, state;
    var cp = result.checkpoint;
    if (result.failure) {
      state = "failed";
      headline = "FAILED (" + result.failure + ")";
    } else if (counts.failed) {
      state = "failed";
      headline = "FAILED (" + counts.failed + " of " + total + " entries: " + firstFailure + ")";
    } else if (!cp) {
      state = "pending";
      headline = "No signed checkpoint yet: nothing on this page can be verified now; " + PENDING_TEXT + ".";
    } else if (counts.verified === total) {
      state = "verified";
      headline = "All " + total + " entries verified against checkpoint " + cp.size + ".";
    } else {
      state = counts.verified ? "partial" : "pending";
      headline = counts.verified + " of " + total + " entries verified against checkpoint " + cp.size + "; the others are not (see below).";
    }
    if (cp && !result.failure) {
      lines.push("Checkpoint " + cp.size + ": signed by the ledger key " + result.logKey.name + "+" + result.logKey.id + ".");
      var k = result.witnesses.length;
      lines.push(k
        ? "Cosigned by " + cp.cosigners.length + " of the " + k + " witness" + (k === 1 ? "" : "es") + " this service names" + (cp.cosigners.length ? " (" + cp.cosigners.join(", ") + ")." : ": no witness has vouched for this checkpoint yet.")
        : "This service names no witnesses: nobody else has vouched that the ledger shows everyone the same log.");
      if (cp.ignored) lines.push(cp.ignored + " signature" + (cp.ignored === 1 ? "" : "s") + " by keys this service does not name were not checked.");
      lines.push(result.remembered !== undefined
        ? "Consistent with checkpoint " + result.remembered + ", which this browser saw earlier: the log was not rewritten."
        : "This browser had seen no checkpoint of this ledger before; it remembers this one to detect a rewrite next time.");
    }
    lines.push("Entries: " + counts.verified + " verified against checkpoint " + (cp ? cp.size : "(none)") + ", " + counts.pending + " " + PENDING_TEXT + ", " + counts.unlogged + " " + UNLOGGED_TEXT + ", " + counts.failed + " FAILED.");
    if (result.truncated) lines.push("Only the first entries of this large history were read and checked.");
    result.notices.forEach(function (n) { lines.push("The service says: " + n); });
    return { state: state, headline: headline, lines: lines };
  }

  function show(status, state, headline, lines) {
    status.textContent = "";
    status.setAttribute("data-verify-state", state);
    status.appendChild(el("strong", {}, headline));
    if (lines && lines.length) {
      var ul = el("ul");
      lines.forEach(function (l) { ul.appendChild(el("li", {}, l)); });
      status.appendChild(ul);
    }
  }

  function setup() {
    var m = /^\/app\/Patient\/([A-Za-z0-9.\-]{1,64})\/?$/.exec(location.pathname);
    var main = document.getElementById("main");
    if (!m || !main || document.getElementById("verify")) return;
    var pid = m[1];
    var box = el("section", { id: "verify", class: "verify", "aria-labelledby": "h-verify" });
    box.appendChild(el("h2", { id: "h-verify" }, "Ledger verification"));
    box.appendChild(el("p", {}, "Verify checks, in this browser and without trusting this service's word, that the bundle each entry came from was logged unchanged in fhirbridge's ledger: its inclusion proof against the ledger's signed checkpoint, the checkpoint's signature by the ledger key and its witnesses' cosignatures, and that the ledger was not rewritten since the last checkpoint this browser saw."));
    box.appendChild(el("p", {}, "What it does not prove: that a bundle's content is true (a hospital can log a wrong value), nor that nothing was left out (a source may not have sent everything, and this page shows only what the API returned to you)."));
    box.appendChild(el("p", {}, "The ledger key is the one this service is configured with. A compromised service could name another key; to rule that out, compare the key shown after verifying with the one your organisation publishes."));
    var button = el("button", { type: "button", id: "verify-button" }, "Verify");
    var status = el("div", { id: "verify-status", role: "status", "aria-live": "polite" });
    box.appendChild(button);
    box.appendChild(status);
    var banner = main.querySelector(".banner");
    if (banner && banner.nextSibling) main.insertBefore(box, banner.nextSibling);
    else main.appendChild(box);

    button.addEventListener("click", async function () {
      button.disabled = true;
      show(status, "running", "Verifying…");
      try {
        last = await verifyPage(pid);
        var s = summary(last);
        show(status, s.state, s.headline, s.lines.concat(["Ledger key: " + last.logKey.text].concat(last.witnesses.map(function (w) { return "Witness key: " + w.text; }))));
      } catch (e) {
        var unsupported = e instanceof Unsupported;
        last = { entries: new Map(), fallback: { state: unsupported ? "unchecked" : "failed", reason: reasonOf(e) } };
        if (unsupported) {
          show(status, "unsupported", "Not verified: " + e.reason + ". Nothing on this page has been checked; use a current browser over HTTPS, or `fhirbridge ledger verify`.");
        } else {
          show(status, "failed", "FAILED (" + reasonOf(e) + ")");
        }
      }
      annotate();
      button.disabled = false;
    });
    document.body.addEventListener("htmx:afterSettle", annotate); // a section page swapped in
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
