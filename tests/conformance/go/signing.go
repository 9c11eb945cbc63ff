// Ed25519 record signatures, as contract/asyncapi.yaml x-saga-signing states them: the signed
// bytes are a domain tag, then signer, key id, topic, record key and value, each
// length-prefixed.
package main

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"

	"github.com/twmb/franz-go/pkg/kgo"
)

const domain = "saga-engine/record-signature/v1\x00"

// field is one length-prefixed part of the signed bytes: 0x00 when absent, else 0x01, a
// 4-byte big-endian length and the bytes.
func field(data []byte, present bool) []byte {
	if !present {
		return []byte{0}
	}
	out := make([]byte, 5, 5+len(data))
	out[0] = 1
	binary.BigEndian.PutUint32(out[1:], uint32(len(data)))
	return append(out, data...)
}

// signedBytes is what a record's signature covers.
func signedBytes(signer, keyID, topic string, key []byte, value []byte) []byte {
	msg := []byte(domain)
	msg = append(msg, field([]byte(signer), true)...)
	msg = append(msg, field([]byte(keyID), true)...)
	msg = append(msg, field([]byte(topic), true)...)
	msg = append(msg, field(key, key != nil)...)
	msg = append(msg, field(value, value != nil)...)
	return msg
}

// Signer is this service's private key (a key file of `saga keys new`).
type Signer struct {
	Principal string
	KeyID     string
	key       ed25519.PrivateKey
}

// LoadSigner reads a key file: {saga_signing_key: 1, algorithm: ed25519, principal, key_id,
// private_key: base64 of the 32-byte seed, public_key}.
func LoadSigner(path string) (*Signer, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f struct {
		Version    int    `json:"saga_signing_key"`
		Algorithm  string `json:"algorithm"`
		Principal  string `json:"principal"`
		KeyID      string `json:"key_id"`
		PrivateKey string `json:"private_key"`
		PublicKey  string `json:"public_key"`
	}
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	if f.Version != 1 || f.Algorithm != "ed25519" {
		return nil, fmt.Errorf("key file %s is not a saga ed25519 signing key", path)
	}
	seed, err := base64.StdEncoding.DecodeString(f.PrivateKey)
	if err != nil || len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("key file %s: private_key is not 32 bytes of base64", path)
	}
	key := ed25519.NewKeyFromSeed(seed)
	if f.PublicKey != "" && f.PublicKey != base64.StdEncoding.EncodeToString(key.Public().(ed25519.PublicKey)) {
		return nil, fmt.Errorf("key file %s: its public key does not belong to its private key", path)
	}
	return &Signer{Principal: f.Principal, KeyID: f.KeyID, key: key}, nil
}

// Sign replaces any signature headers of r by this key's signature of it.
func (s *Signer) Sign(r *kgo.Record) {
	kept := r.Headers[:0:0]
	for _, h := range r.Headers {
		if h.Key != signerHeader && h.Key != keyIDHeader && h.Key != signatureHdr {
			kept = append(kept, h)
		}
	}
	sig := ed25519.Sign(s.key, signedBytes(s.Principal, s.KeyID, r.Topic, r.Key, r.Value))
	r.Headers = append(kept,
		kgo.RecordHeader{Key: signerHeader, Value: []byte(s.Principal)},
		kgo.RecordHeader{Key: keyIDHeader, Value: []byte(s.KeyID)},
		kgo.RecordHeader{Key: signatureHdr, Value: []byte(base64.StdEncoding.EncodeToString(sig))},
	)
}

type trustedKey struct {
	principal string
	public    ed25519.PublicKey
}

// Trust is who may command this service: the keyring's keys and the coordinator principals.
type Trust struct {
	keys         map[string]trustedKey
	coordinators map[string]bool
}

// LoadTrust reads {"coordinators": [...], "keys": {"<key id>": {"principal", "public_key"}}}:
// the keyring's entries (as `saga keys list --json` gives them) and the policy's coordinators.
func LoadTrust(path string) (*Trust, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f struct {
		Coordinators []string `json:"coordinators"`
		Keys         map[string]struct {
			Principal string `json:"principal"`
			PublicKey string `json:"public_key"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("trust file %s: %w", path, err)
	}
	t := &Trust{keys: map[string]trustedKey{}, coordinators: map[string]bool{}}
	for id, k := range f.Keys {
		pub, err := base64.StdEncoding.DecodeString(k.PublicKey)
		if err != nil || len(pub) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("trust file %s: key %q is not 32 bytes of base64", path, id)
		}
		t.keys[id] = trustedKey{k.Principal, pub}
	}
	for _, c := range f.Coordinators {
		t.coordinators[c] = true
	}
	return t, nil
}

// refusal is why a record is not let in: the dead letter's reason and detail.
type refusal struct{ reason, detail string }

// Verify returns the principal that signed r, or why it is refused (saga.runtime.signing's
// Keyring.verify, then the participant gate: only a coordinator may send commands).
func (t *Trust) Verify(r *kgo.Record) (string, *refusal) {
	var signer, keyID, signature []byte
	var seen [3]bool
	for _, h := range r.Headers {
		idx := map[string]int{signerHeader: 0, keyIDHeader: 1, signatureHdr: 2}
		i, ok := idx[h.Key]
		if !ok {
			continue
		}
		if seen[i] {
			return "", &refusal{"unauthenticated", "header " + h.Key + " appears twice"}
		}
		seen[i] = true
		switch i {
		case 0:
			signer = h.Value
		case 1:
			keyID = h.Value
		default:
			signature = h.Value
		}
	}
	if !seen[0] && !seen[1] && !seen[2] {
		return "", &refusal{"unauthenticated", "unsigned"}
	}
	if !seen[0] || !seen[1] || !seen[2] {
		return "", &refusal{"unauthenticated", "incomplete signature"}
	}
	entry, ok := t.keys[string(keyID)]
	if !ok {
		return "", &refusal{"unauthenticated", fmt.Sprintf("unknown key id %q", keyID)}
	}
	if string(signer) != entry.principal {
		return "", &refusal{"unauthenticated", fmt.Sprintf("signer header says %q but key %q belongs to %q", signer, keyID, entry.principal)}
	}
	sig, err := base64.StdEncoding.DecodeString(string(signature))
	if err != nil || len(sig) != ed25519.SignatureSize ||
		!ed25519.Verify(entry.public, signedBytes(string(signer), string(keyID), r.Topic, r.Key, r.Value), sig) {
		return "", &refusal{"unauthenticated", fmt.Sprintf("bad signature (key %q of %q)", keyID, entry.principal)}
	}
	if !t.coordinators[entry.principal] {
		return "", &refusal{"forbidden", fmt.Sprintf("command signed by %q, which is not a coordinator in the policy", entry.principal)}
	}
	return entry.principal, nil
}
