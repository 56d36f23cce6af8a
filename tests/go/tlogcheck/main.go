// Command tlogcheck is the independent verifier in Pli's transparency-log interop
// tests (tests/test_log_interop.py). It checks what Pli's Python code produces with
// Go's golang.org/x/mod/sumdb/note and golang.org/x/mod/sumdb/tlog, and produces
// proofs and signatures with them for the Python side to check.
//
// It reads one JSON request on stdin, {"cases": [{"op": ..., ...}, ...]}, and writes
// {"results": [...]} on stdout, one result per case, in order. A result always has
// "ok" (bool) and, when ok is false, "error". Byte strings are standard base64.
//
// Built offline in GOPATH mode from Debian's golang-golang-x-mod-dev sources:
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o tlogcheck ./tests/go/tlogcheck
package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

type request struct {
	Cases []map[string]json.RawMessage `json:"cases"`
}

type result map[string]interface{}

func main() {
	var req request
	dec := json.NewDecoder(bufio.NewReader(os.Stdin))
	if err := dec.Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "tlogcheck: bad request:", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(req.Cases))
	for _, c := range req.Cases {
		r, err := run(c)
		if r == nil {
			r = result{}
		}
		r["ok"] = err == nil
		if err != nil {
			r["error"] = err.Error()
		}
		results = append(results, r)
	}
	out := bufio.NewWriter(os.Stdout)
	if err := json.NewEncoder(out).Encode(map[string]interface{}{"results": results}); err != nil {
		fmt.Fprintln(os.Stderr, "tlogcheck:", err)
		os.Exit(2)
	}
	out.Flush()
}

func str(c map[string]json.RawMessage, k string) string {
	var s string
	if err := json.Unmarshal(c[k], &s); err != nil {
		panic(fmt.Sprintf("field %q: %v", k, err))
	}
	return s
}

func num(c map[string]json.RawMessage, k string) int64 {
	var n int64
	if err := json.Unmarshal(c[k], &n); err != nil {
		panic(fmt.Sprintf("field %q: %v", k, err))
	}
	return n
}

func strs(c map[string]json.RawMessage, k string) []string {
	var s []string
	if err := json.Unmarshal(c[k], &s); err != nil {
		panic(fmt.Sprintf("field %q: %v", k, err))
	}
	return s
}

func hashes(b64 []string) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(b64))
	for i, s := range b64 {
		h, err := tlog.ParseHash(s)
		if err != nil {
			return nil, err
		}
		out[i] = h
	}
	return out, nil
}

func hashStrings(hs []tlog.Hash) []string {
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = h.String()
	}
	return out
}

func run(c map[string]json.RawMessage) (result, error) {
	switch op := str(c, "op"); op {
	case "open_checkpoint":
		cp, err := openCheckpoint([]byte(str(c, "note")), str(c, "vkey"), str(c, "origin"))
		if err != nil {
			return nil, err
		}
		return result{"size": cp.N, "hash": cp.Hash.String()}, nil
	case "open_note":
		v, err := note.NewVerifier(str(c, "vkey"))
		if err != nil {
			return nil, err
		}
		n, err := note.Open([]byte(str(c, "note")), note.VerifierList(v))
		if err != nil {
			return nil, err
		}
		return result{"text": n.Text, "sigs": len(n.Sigs), "unverified": len(n.UnverifiedSigs)}, nil
	case "check_record":
		p, err := hashes(strs(c, "proof"))
		if err != nil {
			return nil, err
		}
		leaf, err := tlog.ParseHash(str(c, "leaf"))
		if err != nil {
			return nil, err
		}
		root, err := tlog.ParseHash(str(c, "root"))
		if err != nil {
			return nil, err
		}
		return nil, tlog.CheckRecord(p, num(c, "size"), root, num(c, "index"), leaf)
	case "check_tree":
		p, err := hashes(strs(c, "proof"))
		if err != nil {
			return nil, err
		}
		oldRoot, err := tlog.ParseHash(str(c, "old_root"))
		if err != nil {
			return nil, err
		}
		newRoot, err := tlog.ParseHash(str(c, "new_root"))
		if err != nil {
			return nil, err
		}
		// CheckTree(p, t, th, n, h): tree t with hash th contains tree n with hash h.
		return nil, tlog.CheckTree(p, num(c, "new_size"), newRoot, num(c, "old_size"), oldRoot)
	case "tlog_proof":
		return checkTlogProof([]byte(str(c, "text")), str(c, "vkey"), str(c, "origin"), str(c, "leaf"))
	case "prove":
		return prove(strs(c, "leaves"))
	case "sign":
		s, err := note.NewSigner(str(c, "skey"))
		if err != nil {
			return nil, err
		}
		msg, err := note.Sign(&note.Note{Text: str(c, "text")}, s)
		if err != nil {
			return nil, err
		}
		return result{"note": string(msg)}, nil
	default:
		return nil, fmt.Errorf("unknown op %q", op)
	}
}

// openCheckpoint verifies a note with note.Open and parses its text as a
// c2sp.org/tlog-checkpoint: origin, decimal size, base64 hash, extension lines.
// For the origin "go.sum database tree" the text is also fed to tlog.ParseTree,
// which must agree: that is sumdb's own tree note format.
func openCheckpoint(msg []byte, vkey, origin string) (tlog.Tree, error) {
	v, err := note.NewVerifier(vkey)
	if err != nil {
		return tlog.Tree{}, err
	}
	n, err := note.Open(msg, note.VerifierList(v))
	if err != nil {
		return tlog.Tree{}, err
	}
	if !strings.HasSuffix(n.Text, "\n") {
		return tlog.Tree{}, errors.New("checkpoint text does not end in a newline")
	}
	lines := strings.Split(strings.TrimSuffix(n.Text, "\n"), "\n")
	if len(lines) < 3 {
		return tlog.Tree{}, errors.New("checkpoint has fewer than three lines")
	}
	for _, l := range lines {
		if l == "" {
			return tlog.Tree{}, errors.New("empty checkpoint line")
		}
	}
	if lines[0] != origin {
		return tlog.Tree{}, fmt.Errorf("origin %q, want %q", lines[0], origin)
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil || size < 0 || strconv.FormatInt(size, 10) != lines[1] {
		return tlog.Tree{}, errors.New("malformed tree size")
	}
	h, err := tlog.ParseHash(lines[2])
	if err != nil {
		return tlog.Tree{}, err
	}
	tree := tlog.Tree{N: size, Hash: h}
	if origin == "go.sum database tree" {
		t2, err := tlog.ParseTree([]byte(n.Text))
		if err != nil {
			return tlog.Tree{}, err
		}
		if t2 != tree {
			return tlog.Tree{}, errors.New("tlog.ParseTree disagrees")
		}
	}
	return tree, nil
}

// checkTlogProof parses a c2sp.org/tlog-proof as the spec describes it, verifies its
// checkpoint and runs its inclusion proof with tlog.CheckRecord.
func checkTlogProof(text []byte, vkey, origin, leafB64 string) (result, error) {
	leaf, err := tlog.ParseHash(leafB64)
	if err != nil {
		return nil, err
	}
	rest := text
	nextLine := func() (string, error) {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			return "", errors.New("truncated tlog proof")
		}
		line := string(rest[:i])
		rest = rest[i+1:]
		return line, nil
	}
	line, err := nextLine()
	if err != nil || line != "c2sp.org/tlog-proof@v1" {
		return nil, errors.New("missing tlog-proof header")
	}
	if line, err = nextLine(); err != nil {
		return nil, err
	}
	var extra []byte
	if strings.HasPrefix(line, "extra ") {
		if extra, err = base64.StdEncoding.Strict().DecodeString(strings.TrimPrefix(line, "extra ")); err != nil {
			return nil, err
		}
		if line, err = nextLine(); err != nil {
			return nil, err
		}
	}
	if !strings.HasPrefix(line, "index ") {
		return nil, errors.New("missing index line")
	}
	idxStr := strings.TrimPrefix(line, "index ")
	idx, err := strconv.ParseInt(idxStr, 10, 64)
	if err != nil || idx < 0 || strconv.FormatInt(idx, 10) != idxStr {
		return nil, errors.New("malformed index")
	}
	var proof tlog.RecordProof
	for {
		if line, err = nextLine(); err != nil {
			return nil, err
		}
		if line == "" {
			break
		}
		h, err := tlog.ParseHash(line)
		if err != nil {
			return nil, err
		}
		proof = append(proof, h)
	}
	tree, err := openCheckpoint(rest, vkey, origin)
	if err != nil {
		return nil, err
	}
	if err := tlog.CheckRecord(proof, tree.N, tree.Hash, idx, leaf); err != nil {
		return nil, err
	}
	return result{"index": idx, "size": tree.N, "extra": base64.StdEncoding.EncodeToString(extra)}, nil
}

// prove appends the given records to an in-memory tlog and returns, for every tree
// size n, tlog's root, every record proof and every tree proof from each m in [1, n),
// plus the stored-hash array in tlog's storage order.
func prove(leavesB64 []string) (result, error) {
	var stored []tlog.Hash
	reader := tlog.HashReaderFunc(func(indexes []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(indexes))
		for i, x := range indexes {
			if x < 0 || x >= int64(len(stored)) {
				return nil, fmt.Errorf("no stored hash %d", x)
			}
			out[i] = stored[x]
		}
		return out, nil
	})
	roots := []string{}
	records := [][][]string{{}}
	trees := [][][]string{{}}
	for i, s := range leavesB64 {
		data, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return nil, err
		}
		hs, err := tlog.StoredHashes(int64(i), data, reader)
		if err != nil {
			return nil, err
		}
		stored = append(stored, hs...)
		n := int64(i + 1)
		root, err := tlog.TreeHash(n, reader)
		if err != nil {
			return nil, err
		}
		roots = append(roots, root.String())
		var rp, tp [][]string
		for j := int64(0); j < n; j++ {
			p, err := tlog.ProveRecord(n, j, reader)
			if err != nil {
				return nil, err
			}
			rp = append(rp, hashStrings(p))
		}
		tp = append(tp, nil) // no tlog tree proof from size 0
		for m := int64(1); m <= n; m++ {
			p, err := tlog.ProveTree(n, m, reader)
			if err != nil {
				return nil, err
			}
			tp = append(tp, hashStrings(p))
		}
		records = append(records, rp)
		trees = append(trees, tp)
	}
	return result{"roots": roots, "records": records, "trees": trees, "stored": hashStrings(stored)}, nil
}
