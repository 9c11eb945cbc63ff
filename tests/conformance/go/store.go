// The reply store: outcomes by idempotency key, and start counts, kept in an append-only file
// (one JSON object a line, fsynced) so that a restarted participant still answers a redelivered
// command with its stored outcome. An empty path keeps it in memory only.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
)

// Outcome is what a handler call came to: ok with an output, or an error.
type Outcome struct {
	OK     bool           `json:"ok"`
	Output map[string]any `json:"output"`
	Error  *ErrorInfo     `json:"error"`
}

type storeLine struct {
	Key     string   `json:"key"`
	Outcome *Outcome `json:"outcome,omitempty"`
	Starts  int      `json:"starts,omitempty"`
}

// Store is the participant's reply store (saga.runtime.stores.ReplyStore's rules).
type Store struct {
	outcomes map[string]Outcome
	starts   map[string]int
	file     *os.File
}

// OpenStore loads the store file at path (created if missing).
func OpenStore(path string) (*Store, error) {
	s := &Store{outcomes: map[string]Outcome{}, starts: map[string]int{}}
	if path == "" {
		return s, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 1<<20), 16<<20)
	for scanner.Scan() {
		var line storeLine
		dec := json.NewDecoder(bytes.NewReader(scanner.Bytes()))
		dec.UseNumber() // outputs replay exactly as first replied
		if err := dec.Decode(&line); err != nil {
			// A torn last line (the process died mid-write) is dropped: its outcome was
			// never replied, so the command runs again.
			continue
		}
		if line.Outcome != nil {
			s.outcomes[line.Key] = *line.Outcome
		} else {
			s.starts[line.Key] = line.Starts
		}
	}
	if err := scanner.Err(); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	s.file = f
	return s, nil
}

// Get returns the outcome stored under key, if any.
func (s *Store) Get(key string) (Outcome, bool) {
	o, ok := s.outcomes[key]
	return o, ok
}

// Put stores an outcome under key, durably before it returns.
func (s *Store) Put(key string, o Outcome) error {
	s.outcomes[key] = o
	return s.append(storeLine{Key: key, Outcome: &o})
}

// Increment counts one more start under key and returns the count.
func (s *Store) Increment(key string) (int, error) {
	s.starts[key]++
	n := s.starts[key]
	return n, s.append(storeLine{Key: key, Starts: n})
}

func (s *Store) append(line storeLine) error {
	if s.file == nil {
		return nil
	}
	if _, err := s.file.Write(append(encode(line), '\n')); err != nil {
		return err
	}
	return s.file.Sync()
}

// Close closes the file.
func (s *Store) Close() error {
	if s.file == nil {
		return nil
	}
	return s.file.Close()
}
