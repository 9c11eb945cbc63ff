// The wire format of contract/schemas: the command a participant takes, the reply it sends,
// and the dead letter it writes for a command it cannot use.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
)

// Header names from contract/asyncapi.yaml.
const (
	signerHeader   = "saga-signer"
	keyIDHeader    = "saga-key-id"
	signatureHdr   = "saga-signature"
	unsealedHeader = "saga-unsealed-error"
	dlqReason      = "saga.dlq.reason"
	dlqDetail      = "saga.dlq.detail"
	dlqSource      = "saga.dlq.source"
	dlqTruncated   = "saga.dlq.truncated_from"
	dlqSHA256      = "saga.dlq.sha256"
	dlqMaxValue    = 512 * 1024
	schemaVersion  = 1
	maxDepth       = 64 // the command bound: contract x-saga-limits.commandMaxDepth
	maxOutputDepth = 31 // a reply is read with the foreign bound (32), its output one level in
)

// Command is contract/schemas/command.json. Pointers tell a missing field from a zero one:
// every field but budget is required, and unknown fields are refused.
type Command struct {
	V              *int            `json:"v"`
	Type           *string         `json:"type"`
	MessageID      *string         `json:"message_id"`
	SagaID         *string         `json:"saga_id"`
	SagaName       *string         `json:"saga_name"`
	SagaVersion    *int64          `json:"saga_version"`
	Step           *string         `json:"step"`
	Phase          *string         `json:"phase"`
	Service        *string         `json:"service"`
	Action         *string         `json:"action"`
	Attempt        *int64          `json:"attempt"`
	IdempotencyKey *string         `json:"idempotency_key"`
	Payload        *map[string]any `json:"payload"`
	DeadlineAt     *float64        `json:"deadline_at"`
	At             *float64        `json:"at"`
	Budget         *float64        `json:"budget"`
}

// ErrorInfo is contract/schemas/reply.json#/$defs/ErrorInfo.
type ErrorInfo struct {
	V        int            `json:"v"`
	Type     string         `json:"type"`
	Message  string         `json:"message"`
	Business bool           `json:"business"`
	Details  map[string]any `json:"details"`
}

// Reply is contract/schemas/reply.json, its fields in the order the engine writes them.
type Reply struct {
	V         int            `json:"v"`
	Type      string         `json:"type"`
	MessageID string         `json:"message_id"`
	SagaID    string         `json:"saga_id"`
	Step      string         `json:"step"`
	Phase     string         `json:"phase"`
	Attempt   int64          `json:"attempt"`
	Service   string         `json:"service"`
	OK        bool           `json:"ok"`
	Output    map[string]any `json:"output"`
	Error     *ErrorInfo     `json:"error"`
	At        float64        `json:"at"`
}

// decodeError carries the dead-letter reason of a command that does not decode.
type decodeError struct{ reason, detail string }

func (e *decodeError) Error() string { return e.reason + ": " + e.detail }

// decodeCommand parses a command as strictly as the engine does (saga.core.codec.decode).
func decodeCommand(value []byte, limit int) (*Command, error) {
	if len(value) == 0 {
		return nil, &decodeError{"empty", "the message has no value"}
	}
	if len(value) > limit {
		return nil, &decodeError{"too_large", fmt.Sprintf("%d bytes, the limit is %d", len(value), limit)}
	}
	if !json.Valid(value) {
		return nil, &decodeError{"invalid_json", "not valid JSON"}
	}
	if d := depth(value); d > maxDepth {
		return nil, &decodeError{"too_deep", fmt.Sprintf("nesting deeper than %d", maxDepth)}
	}
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(value, &probe); err != nil {
		return nil, &decodeError{"not_an_object", "expected a JSON object"}
	}
	var v int
	if raw, ok := probe["v"]; !ok || json.Unmarshal(raw, &v) != nil || v != schemaVersion {
		return nil, &decodeError{"unknown_schema_version", fmt.Sprintf("schema version %s; this participant reads [1]", string(probe["v"]))}
	}
	dec := json.NewDecoder(bytes.NewReader(value))
	dec.DisallowUnknownFields()
	dec.UseNumber() // integers of the payload pass through exactly
	var c Command
	if err := dec.Decode(&c); err != nil {
		return nil, &decodeError{"invalid_message", err.Error()}
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, &decodeError{"invalid_json", "trailing data"}
	}
	missing := map[string]bool{
		"message_id": c.MessageID == nil, "saga_id": c.SagaID == nil, "saga_name": c.SagaName == nil,
		"saga_version": c.SagaVersion == nil, "step": c.Step == nil, "phase": c.Phase == nil,
		"service": c.Service == nil, "action": c.Action == nil, "attempt": c.Attempt == nil,
		"idempotency_key": c.IdempotencyKey == nil, "payload": c.Payload == nil || *c.Payload == nil,
		"deadline_at": c.DeadlineAt == nil, "at": c.At == nil,
	}
	for _, name := range []string{"message_id", "saga_id", "saga_name", "saga_version", "step", "phase", "service", "action", "attempt", "idempotency_key", "payload", "deadline_at", "at"} {
		if missing[name] {
			return nil, &decodeError{"invalid_message", name + ": Field required"}
		}
	}
	if c.Type != nil && *c.Type != "command" {
		return nil, &decodeError{"invalid_message", "type: Input should be 'command'"}
	}
	if *c.Phase != "action" && *c.Phase != "compensation" {
		return nil, &decodeError{"invalid_message", "phase: Input should be 'action' or 'compensation'"}
	}
	return &c, nil
}

// depth is the nesting depth of JSON text (an object or array counts one level).
func depth(data []byte) int {
	deepest, level := 0, 0
	inString, escaped := false, false
	for _, b := range data {
		switch {
		case inString:
			if escaped {
				escaped = false
			} else if b == '\\' {
				escaped = true
			} else if b == '"' {
				inString = false
			}
		case b == '"':
			inString = true
		case b == '{' || b == '[':
			level++
			if level > deepest {
				deepest = level
			}
		case b == '}' || b == ']':
			level--
		}
	}
	return deepest
}

// encode writes compact JSON without Go's HTML escaping (the bytes are signed as written).
func encode(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(err) // only our own types are encoded here
	}
	return bytes.TrimRight(buf.Bytes(), "\n")
}
