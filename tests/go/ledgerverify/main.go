// Command ledgerverify checks a running `fhirbridge serve` ledger with code fhirbridge did not write.
//
// It fetches the latest checkpoint, verifies the log's signature with golang.org/x/mod/sumdb/note and
// parses the body with github.com/transparency-dev/formats/log (C2SP tlog-checkpoint). With witness keys
// it requires a valid C2SP cosignature/v1 (algorithm 0x04) from each, verified with
// github.com/transparency-dev/formats/note. It then recomputes each entry's RFC 9162 leaf hash from the
// entry JSON the server serves (canonical JSON: sorted keys, compact, the escapes orjson writes), checks
// the inclusion proofs, recomputes the root of the whole tree and of smaller trees with
// github.com/transparency-dev/merkle/compact and checks the consistency proofs between them with
// github.com/transparency-dev/merkle/proof. Any failure exits 1 with a message saying what failed.
//
// Usage:
//
//	ledgerverify -url http://127.0.0.1:8080 -log-key <vkey> [-witness-key <vkey>]... [-old-checkpoint FILE]
//
// The flags may also be given as LEDGERVERIFY_URL, LEDGERVERIFY_LOG_KEY, LEDGERVERIFY_WITNESS_KEYS
// (comma-separated) and LEDGERVERIFY_ORIGIN.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	tlog "github.com/transparency-dev/formats/log"
	fnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
)

type multiFlag []string

func (m *multiFlag) String() string { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*m = append(*m, s)
		}
	}
	return nil
}

type config struct {
	base        string
	logKey      string
	origin      string
	witnessKeys []string
	leaves      string
	oldCP       string
	saveCP      string
	maxSkew     time.Duration
	client      *http.Client
}

func main() {
	var c config
	var wk multiFlag
	var timeout time.Duration
	flag.StringVar(&c.base, "url", os.Getenv("LEDGERVERIFY_URL"), "base URL of `fhirbridge serve` (env LEDGERVERIFY_URL)")
	flag.StringVar(&c.logKey, "log-key", os.Getenv("LEDGERVERIFY_LOG_KEY"), "the log's signed-note verifier key, or @FILE holding it (env LEDGERVERIFY_LOG_KEY)")
	flag.StringVar(&c.origin, "origin", os.Getenv("LEDGERVERIFY_ORIGIN"), "expected checkpoint origin (default: the log key's name)")
	flag.Var(&wk, "witness-key", "a witness cosignature/v1 verifier key (or @FILE) whose cosignature is required; repeatable (env LEDGERVERIFY_WITNESS_KEYS, comma-separated)")
	flag.StringVar(&c.leaves, "leaves", "all", "leaves to check: all, or a number sampled evenly (first and last included)")
	flag.StringVar(&c.oldCP, "old-checkpoint", "", "a checkpoint saved earlier: the current one must be consistent with it")
	flag.StringVar(&c.saveCP, "save-checkpoint", "", "write the verified checkpoint to this file")
	flag.DurationVar(&c.maxSkew, "max-future", 10*time.Minute, "how far in the future a cosignature timestamp may be")
	flag.DurationVar(&timeout, "timeout", 30*time.Second, "timeout of each HTTP request")
	flag.Parse()
	if env := os.Getenv("LEDGERVERIFY_WITNESS_KEYS"); env != "" && len(wk) == 0 {
		_ = wk.Set(env)
	}
	c.client = &http.Client{Timeout: timeout}
	var err error
	if c.logKey, err = readKey(c.logKey); err == nil {
		for _, k := range wk {
			var key string
			if key, err = readKey(k); err != nil {
				break
			}
			c.witnessKeys = append(c.witnessKeys, key)
		}
	}
	if err == nil {
		err = run(&c)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ledgerverify: FAILED: %v\n", err)
		os.Exit(1)
	}
}

func readKey(v string) (string, error) {
	if strings.HasPrefix(v, "@") {
		b, err := os.ReadFile(v[1:])
		if err != nil {
			return "", fmt.Errorf("reading key file: %v", err)
		}
		v = string(b)
	}
	return strings.TrimSpace(v), nil
}

func run(c *config) error {
	if c.base == "" || c.logKey == "" {
		return errors.New("give -url and -log-key (or LEDGERVERIFY_URL and LEDGERVERIFY_LOG_KEY)")
	}
	c.base = strings.TrimRight(c.base, "/")
	logV, err := note.NewVerifier(c.logKey)
	if err != nil {
		return fmt.Errorf("log key: %v", err)
	}
	if c.origin == "" {
		c.origin = logV.Name()
	}
	var witnessVs []note.Verifier
	for _, k := range c.witnessKeys {
		v, err := fnote.NewVerifierForCosignatureV1(k)
		if err != nil {
			return fmt.Errorf("witness key %q: %v", k, err)
		}
		if alg := keyAlg(k); alg != 0x04 {
			return fmt.Errorf("witness key %q is not a cosignature/v1 (0x04) key (algorithm %#02x)", k, alg)
		}
		witnessVs = append(witnessVs, v)
	}

	// 1. The checkpoint: the log's signature, the C2SP body, the witnesses' cosignatures.
	raw, err := c.getText("/ledger/checkpoint")
	if err != nil {
		return err
	}
	cp, n, err := openCheckpoint(raw, c.origin, logV, witnessVs, c.maxSkew)
	if err != nil {
		return err
	}
	fmt.Printf("checkpoint: origin %q size %d root %s, log signature OK\n", cp.Origin, cp.Size, b64(cp.Hash))
	for _, v := range witnessVs {
		for _, s := range n.Sigs {
			if s.Name == v.Name() && s.Hash == v.KeyHash() {
				ts, _ := fnote.CoSigV1Timestamp(s)
				fmt.Printf("cosignature: witness %s OK (time %s)\n", v.Name(), ts.UTC().Format(time.RFC3339))
			}
		}
	}
	if cp.Size == 0 {
		return errors.New("the checkpoint commits to an empty log: nothing to verify")
	}

	// 2. Entries: recompute each leaf hash from the served entry JSON; inclusion proofs against the root.
	indices, all, err := sample(c.leaves, cp.Size)
	if err != nil {
		return err
	}
	leafHashes := make(map[uint64][]byte, len(indices))
	type entryDoc struct {
		Index    uint64          `json:"index"`
		LeafHash string          `json:"leaf_hash"`
		Entry    json.RawMessage `json:"entry"`
	}
	var firstEntry map[string]any
	for _, i := range indices {
		var doc entryDoc
		if err := c.getJSON(fmt.Sprintf("/ledger/entries/%d", i), &doc); err != nil {
			return err
		}
		canon, fields, err := canonicalJSON(doc.Entry)
		if err != nil {
			return fmt.Errorf("entry %d: %v", i, err)
		}
		leaf := rfc6962.DefaultHasher.HashLeaf(canon)
		served, err := base64.StdEncoding.DecodeString(doc.LeafHash)
		if err != nil || doc.Index != i {
			return fmt.Errorf("entry %d: malformed answer", i)
		}
		if !bytes.Equal(leaf, served) {
			return fmt.Errorf("entry %d: the leaf hash recomputed from the entry (%s) is not the one served (%s)", i, b64(leaf), doc.LeafHash)
		}
		leafHashes[i] = leaf
		if firstEntry == nil {
			firstEntry = fields
		}

		var inc struct {
			Index      uint64   `json:"index"`
			Size       uint64   `json:"size"`
			LeafHash   string   `json:"leaf_hash"`
			Proof      []string `json:"proof"`
			Checkpoint string   `json:"checkpoint"`
		}
		q := url.Values{"index": {strconv.FormatUint(i, 10)}, "size": {strconv.FormatUint(cp.Size, 10)}}
		if err := c.getJSON("/ledger/proof/inclusion?"+q.Encode(), &inc); err != nil {
			return err
		}
		p, err := decodeHashes(inc.Proof)
		if err != nil || inc.Index != i || inc.Size != cp.Size {
			return fmt.Errorf("inclusion proof of %d: malformed answer", i)
		}
		if err := proof.VerifyInclusion(rfc6962.DefaultHasher, i, cp.Size, leaf, p, cp.Hash); err != nil {
			return fmt.Errorf("inclusion proof of leaf %d in the tree of size %d: %v", i, cp.Size, err)
		}
	}
	fmt.Printf("entries: %d leaf hashes recomputed from the entries, %d inclusion proofs OK\n", len(indices), len(indices))

	// The same through a lookup by leaf hash and /ledger/prove (the answer a client gets for a bundle).
	if err := c.checkLookups(cp, indices[0], leafHashes[indices[0]], firstEntry, logV); err != nil {
		return err
	}

	// 3. The root of the whole tree, and consistency proofs between smaller trees and this one.
	proofs := 0
	if all {
		ordered := make([][]byte, cp.Size)
		for i := uint64(0); i < cp.Size; i++ {
			ordered[i] = leafHashes[i]
		}
		root, err := rootOf(ordered)
		if err != nil {
			return err
		}
		if !bytes.Equal(root, cp.Hash) {
			return fmt.Errorf("the root recomputed from all %d entries (%s) is not the checkpoint's (%s)", cp.Size, b64(root), b64(cp.Hash))
		}
		fmt.Printf("root: recomputed from all %d entries, matches the checkpoint\n", cp.Size)
		sizes := consistencySizes(cp.Size)
		for a, m := range sizes {
			rootM, _ := rootOf(ordered[:m])
			targets := []uint64{cp.Size}
			if a+1 < len(sizes) {
				targets = append(targets, sizes[a+1])
			}
			for _, to := range targets {
				rootTo, _ := rootOf(ordered[:to])
				if err := c.checkConsistency(m, to, rootM, rootTo); err != nil {
					return err
				}
				proofs++
			}
		}
	}
	if c.oldCP != "" {
		oldRaw, err := os.ReadFile(c.oldCP)
		if err != nil {
			return fmt.Errorf("old checkpoint: %v", err)
		}
		old, _, err := openCheckpoint(oldRaw, c.origin, logV, nil, c.maxSkew)
		if err != nil {
			return fmt.Errorf("old checkpoint: %v", err)
		}
		if old.Size > cp.Size {
			return fmt.Errorf("rollback: the log's checkpoint has size %d, smaller than the old checkpoint's %d", cp.Size, old.Size)
		}
		if old.Size == cp.Size && !bytes.Equal(old.Hash, cp.Hash) {
			return fmt.Errorf("split view: two roots for size %d", cp.Size)
		}
		if old.Size > 0 && old.Size < cp.Size {
			if err := c.checkConsistency(old.Size, cp.Size, old.Hash, cp.Hash); err != nil {
				return fmt.Errorf("the current checkpoint is not consistent with the old one: %v", err)
			}
			proofs++
		}
		fmt.Printf("old checkpoint: size %d, consistent with the current one\n", old.Size)
	}
	fmt.Printf("consistency: %d proofs OK\n", proofs)
	if c.saveCP != "" {
		if err := os.WriteFile(c.saveCP, raw, 0o644); err != nil {
			return err
		}
	}
	fmt.Println("OK")
	return nil
}

// openCheckpoint verifies the log's signature and every required witness cosignature, and parses the body.
func openCheckpoint(raw []byte, origin string, logV note.Verifier, witnessVs []note.Verifier, maxSkew time.Duration) (*tlog.Checkpoint, *note.Note, error) {
	cp, _, n, err := tlog.ParseCheckpoint(raw, origin, logV, witnessVs...)
	if err != nil {
		return nil, nil, fmt.Errorf("checkpoint: %v", err)
	}
	if len(cp.Hash) != 32 {
		return nil, nil, fmt.Errorf("checkpoint: the root hash has %d bytes, want 32", len(cp.Hash))
	}
	for _, v := range witnessVs {
		found := false
		for _, s := range n.Sigs { // n.Sigs holds only signatures that verified
			if s.Name == v.Name() && s.Hash == v.KeyHash() {
				ts, err := fnote.CoSigV1Timestamp(s)
				if err != nil {
					return nil, nil, fmt.Errorf("cosignature of %s: %v", v.Name(), err)
				}
				if ts.After(time.Now().Add(maxSkew)) {
					return nil, nil, fmt.Errorf("cosignature of %s is dated in the future (%s)", v.Name(), ts.UTC())
				}
				found = true
			}
		}
		if !found {
			return nil, nil, fmt.Errorf("checkpoint: no valid cosignature from witness %s+%08x", v.Name(), v.KeyHash())
		}
	}
	return cp, n, nil
}

func (c *config) checkConsistency(from, to uint64, rootFrom, rootTo []byte) error {
	var cons struct {
		From  uint64   `json:"from"`
		To    uint64   `json:"to"`
		Proof []string `json:"proof"`
	}
	q := url.Values{"from": {strconv.FormatUint(from, 10)}, "to": {strconv.FormatUint(to, 10)}}
	if err := c.getJSON("/ledger/proof/consistency?"+q.Encode(), &cons); err != nil {
		return err
	}
	p, err := decodeHashes(cons.Proof)
	if err != nil || cons.From != from || cons.To != to {
		return fmt.Errorf("consistency proof %d -> %d: malformed answer", from, to)
	}
	if err := proof.VerifyConsistency(rfc6962.DefaultHasher, from, to, p, rootFrom, rootTo); err != nil {
		return fmt.Errorf("consistency proof %d -> %d: %v", from, to, err)
	}
	return nil
}

func (c *config) checkLookups(cp *tlog.Checkpoint, i uint64, leaf []byte, entry map[string]any, logV note.Verifier) error {
	var inc struct {
		Index uint64   `json:"index"`
		Proof []string `json:"proof"`
	}
	q := url.Values{"leaf_hash": {hex.EncodeToString(leaf)}, "size": {strconv.FormatUint(cp.Size, 10)}}
	if err := c.getJSON("/ledger/proof/inclusion?"+q.Encode(), &inc); err != nil {
		return err
	}
	p, err := decodeHashes(inc.Proof)
	if err != nil || inc.Index != i {
		return fmt.Errorf("inclusion proof by leaf hash of %d: malformed answer or wrong index %d", i, inc.Index)
	}
	if err := proof.VerifyInclusion(rfc6962.DefaultHasher, i, cp.Size, leaf, p, cp.Hash); err != nil {
		return fmt.Errorf("inclusion proof by leaf hash of %d: %v", i, err)
	}
	bundle, _ := entry["bundle_sha256"].(string)
	org, _ := entry["source_org"].(string)
	var pr struct {
		Index      uint64          `json:"index"`
		Size       *uint64         `json:"size"`
		LeafHash   string          `json:"leaf_hash"`
		Entry      json.RawMessage `json:"entry"`
		Proof      []string        `json:"proof"`
		Checkpoint string          `json:"checkpoint"`
	}
	q = url.Values{"bundle_sha256": {bundle}, "source_org": {org}}
	if err := c.getJSON("/ledger/prove?"+q.Encode(), &pr); err != nil {
		return err
	}
	if pr.Size == nil || pr.Proof == nil {
		return fmt.Errorf("/ledger/prove: entry %d has no proof against the latest checkpoint", i)
	}
	pcp, _, err := openCheckpoint([]byte(pr.Checkpoint), c.origin, logV, nil, c.maxSkew)
	if err != nil {
		return fmt.Errorf("/ledger/prove: %v", err)
	}
	canon, _, err := canonicalJSON(pr.Entry)
	if err != nil {
		return fmt.Errorf("/ledger/prove: %v", err)
	}
	pleaf := rfc6962.DefaultHasher.HashLeaf(canon)
	pp, err := decodeHashes(pr.Proof)
	if err != nil || pr.Index != i || *pr.Size != pcp.Size || pr.LeafHash != b64(pleaf) {
		return fmt.Errorf("/ledger/prove for entry %d: malformed or inconsistent answer", i)
	}
	if err := proof.VerifyInclusion(rfc6962.DefaultHasher, i, pcp.Size, pleaf, pp, pcp.Hash); err != nil {
		return fmt.Errorf("/ledger/prove for entry %d: %v", i, err)
	}
	fmt.Printf("lookups: by leaf hash and /ledger/prove for entry %d OK\n", i)
	return nil
}

// canonicalJSON re-encodes an entry as the ledger commits to it: one JSON object, keys sorted, no
// spaces, integers as written, strings with only '"', '\\' and control characters escaped (\b \f \n
// \r \t short, others \u00xx), everything else raw UTF-8 — the bytes orjson writes with OPT_SORT_KEYS.
func canonicalJSON(raw []byte) ([]byte, map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var obj map[string]any
	if err := dec.Decode(&obj); err != nil {
		return nil, nil, fmt.Errorf("entry is not a JSON object: %v", err)
	}
	if obj == nil {
		return nil, nil, errors.New("entry is not a JSON object")
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		if err := writeString(&b, k); err != nil {
			return nil, nil, err
		}
		b.WriteByte(':')
		switch v := obj[k].(type) {
		case nil:
			b.WriteString("null")
		case string:
			if err := writeString(&b, v); err != nil {
				return nil, nil, err
			}
		case json.Number:
			if _, err := strconv.ParseUint(v.String(), 10, 64); err != nil {
				return nil, nil, fmt.Errorf("field %q is not a non-negative integer", k)
			}
			b.WriteString(v.String())
		default:
			return nil, nil, fmt.Errorf("field %q has an unexpected type %T", k, v)
		}
	}
	b.WriteByte('}')
	return b.Bytes(), obj, nil
}

func writeString(b *bytes.Buffer, s string) error {
	if !utf8.ValidString(s) {
		return errors.New("string is not valid UTF-8")
	}
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case ch == '"':
			b.WriteString(`\"`)
		case ch == '\\':
			b.WriteString(`\\`)
		case ch == '\b':
			b.WriteString(`\b`)
		case ch == '\f':
			b.WriteString(`\f`)
		case ch == '\n':
			b.WriteString(`\n`)
		case ch == '\r':
			b.WriteString(`\r`)
		case ch == '\t':
			b.WriteString(`\t`)
		case ch < 0x20:
			fmt.Fprintf(b, `\u%04x`, ch)
		default:
			b.WriteByte(ch)
		}
	}
	b.WriteByte('"')
	return nil
}

// rootOf is the RFC 9162 Merkle tree hash of leaf hashes, computed with transparency-dev's compact ranges.
func rootOf(leaves [][]byte) ([]byte, error) {
	rf := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
	r := rf.NewEmptyRange(0)
	for _, l := range leaves {
		if err := r.Append(l, nil); err != nil {
			return nil, err
		}
	}
	if len(leaves) == 0 {
		return rfc6962.DefaultHasher.EmptyRoot(), nil
	}
	return r.GetRootHash(nil)
}

// sample returns the leaf indices to check, and whether that is every leaf.
func sample(spec string, size uint64) ([]uint64, bool, error) {
	n := size
	if spec != "all" {
		v, err := strconv.ParseUint(spec, 10, 64)
		if err != nil || v == 0 {
			return nil, false, errors.New("-leaves must be all or a positive number")
		}
		n = min(v, size)
	}
	if n == size {
		out := make([]uint64, size)
		for i := range out {
			out[i] = uint64(i)
		}
		return out, true, nil
	}
	seen := map[uint64]bool{}
	var out []uint64
	for k := uint64(0); k < n; k++ {
		i := uint64(0)
		if n > 1 {
			i = k * (size - 1) / (n - 1)
		}
		if !seen[i] {
			seen[i] = true
			out = append(out, i)
		}
	}
	return out, false, nil
}

// consistencySizes are the smaller tree sizes whose consistency with the checkpoint is checked: 1, 2,
// 3, the powers of two, their neighbours, and a few in between, all below size.
func consistencySizes(size uint64) []uint64 {
	set := map[uint64]bool{}
	add := func(m uint64) {
		if m >= 1 && m < size {
			set[m] = true
		}
	}
	for m := uint64(1); m < size; m *= 2 {
		add(m - 1)
		add(m)
		add(m + 1)
	}
	for k := uint64(1); k < 8; k++ {
		add(size * k / 8)
	}
	add(size - 1)
	out := make([]uint64, 0, len(set))
	for m := range set {
		out = append(out, m)
	}
	sort.Slice(out, func(a, b int) bool { return out[a] < out[b] })
	return out
}

func keyAlg(vkey string) byte {
	parts := strings.SplitN(vkey, "+", 3)
	if len(parts) != 3 {
		return 0
	}
	k, err := base64.StdEncoding.DecodeString(parts[2])
	if err != nil || len(k) == 0 {
		return 0
	}
	return k[0]
}

func decodeHashes(in []string) ([][]byte, error) {
	out := make([][]byte, len(in))
	for i, s := range in {
		h, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(h) != 32 {
			return nil, errors.New("a proof hash is not 32 bytes of base64")
		}
		out[i] = h
	}
	return out, nil
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func (c *config) get(path string) ([]byte, error) {
	resp, err := c.client.Get(c.base + path)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: HTTP %d: %.200s", path, resp.StatusCode, body)
	}
	return body, nil
}

func (c *config) getText(path string) ([]byte, error) { return c.get(path) }

func (c *config) getJSON(path string, v any) error {
	body, err := c.get(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: not the JSON expected: %v", path, err)
	}
	return nil
}
