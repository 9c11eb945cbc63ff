// A saga participant in Go, written against contract/ alone: it serves the "warehouse" service
// of a saga on a real Kafka broker, as saga.runtime.participant does for Python services.
//
// It consumes <prefix>.commands.<service> in the group <prefix>.participant.<service>
// (read_committed, from the earliest offset, range assignor, manual commits), runs the action
// or compensation a command names, and replies on <prefix>.replies keyed by the saga id
// (murmur2, Kafka's partitioner), then commits the command's offset. The reply rules are those
// of contract/asyncapi.yaml x-saga-participant, in order: a stored outcome is replied again; an
// action after its step's compensation is refused; a command past its budget is Expired; a
// handler started too often without an outcome is Redelivered and dead-lettered; otherwise the
// handler runs and its outcome is stored (in -store, a file, so that a restart keeps it).
// With -signing-key and -trust, commands must be signed by a coordinator and replies are
// signed (Ed25519); without them nothing is checked (unsigned mode).
//
// Handlers: "reserve" (a business failure when the input has "reserve_fails": true; a technical
// failure on attempt 1 when it has "reserve_flaky": true) and its compensation "release".
//
// It reports what it does on stdout, one JSON object a line: {"event": "assigned"}, "ran"
// (a handler ran), "replied", "dead_letter", "stopped". SIGTERM or SIGINT stop it: it finishes
// the command in hand, commits and leaves the group.
package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

type config struct {
	bootstrap     string
	prefix        string
	service       string
	partitions    int
	storePath     string
	signingKey    string
	trustPath     string
	clockSkew     float64
	maxDeliveries int
	maxReplyBytes int
}

// Participant serves one service.
type Participant struct {
	cfg      config
	client   *kgo.Client
	store    *Store
	signer   *Signer
	trust    *Trust
	handlers map[string]Handler
	out      *json.Encoder
	outMu    sync.Mutex
}

// Handler runs an action or compensation: its output, or an error (a *StepFailed is a
// business failure, any other a technical one).
type Handler func(payload map[string]any, ctx StepContext) (map[string]any, error)

// StepContext is what a handler knows about its command.
type StepContext struct {
	SagaID, Step, Phase, Action, IdempotencyKey string
	Attempt                                     int64
}

// StepFailed is a business failure: not retried, the saga compensates.
type StepFailed struct {
	Reason  string
	Details map[string]any
}

func (e *StepFailed) Error() string { return e.Reason }

// technical is a technical failure with an error type of its own.
type technical struct{ kind, message string }

func (e *technical) Error() string { return e.message }

func main() {
	var cfg config
	flag.StringVar(&cfg.bootstrap, "bootstrap", "127.0.0.1:9092", "Kafka bootstrap servers")
	flag.StringVar(&cfg.prefix, "prefix", "saga", "topic prefix")
	flag.StringVar(&cfg.service, "service", "warehouse", "the service served")
	flag.IntVar(&cfg.partitions, "partitions", 6, "partitions if the command topic is created")
	flag.StringVar(&cfg.storePath, "store", "", "reply store file (empty: memory)")
	flag.StringVar(&cfg.signingKey, "signing-key", "", "this service's key file (signed mode)")
	flag.StringVar(&cfg.trustPath, "trust", "", "trusted keys and coordinators, JSON (signed mode)")
	flag.Float64Var(&cfg.clockSkew, "clock-skew", 30, "seconds of clock disagreement tolerated")
	flag.IntVar(&cfg.maxDeliveries, "max-deliveries", 5, "starts without an outcome before Redelivered")
	flag.IntVar(&cfg.maxReplyBytes, "max-reply-bytes", 900*1024, "largest reply sent")
	flag.Parse()
	if err := run(cfg); err != nil {
		fmt.Fprintln(os.Stderr, "participant:", err)
		os.Exit(1)
	}
}

func run(cfg config) error {
	if (cfg.signingKey == "") != (cfg.trustPath == "") {
		return errors.New("-signing-key and -trust go together (signed mode) or not at all")
	}
	p := &Participant{cfg: cfg, handlers: warehouse(), out: json.NewEncoder(os.Stdout)}
	var err error
	if p.store, err = OpenStore(cfg.storePath); err != nil {
		return err
	}
	defer p.store.Close()
	if cfg.signingKey != "" {
		if p.signer, err = LoadSigner(cfg.signingKey); err != nil {
			return err
		}
		if p.trust, err = LoadTrust(cfg.trustPath); err != nil {
			return err
		}
	}
	topic := fmt.Sprintf("%s.commands.%s", cfg.prefix, cfg.service)
	group := fmt.Sprintf("%s.participant.%s", cfg.prefix, cfg.service)
	p.client, err = kgo.NewClient(
		kgo.SeedBrokers(strings.Split(cfg.bootstrap, ",")...),
		kgo.ClientID("saga-go-"+cfg.service),
		kgo.ConsumerGroup(group),
		kgo.ConsumeTopics(topic),
		kgo.Balancers(kgo.RangeBalancer()), // shares the group with Python members
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(), // a rebalance waits until the polled commands are committed
		kgo.SessionTimeout(10*time.Second),
		kgo.HeartbeatInterval(time.Second),
		kgo.FetchMaxWait(50*time.Millisecond),
		kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)), // murmur2 of the key, as Kafka's
		kgo.RequiredAcks(kgo.AllISRAcks()),
		// Uncompressed: franz-go would snappy-compress, which aiokafka reads only with an
		// optional library (contract x-saga-transactions.compression).
		kgo.ProducerBatchCompression(kgo.NoCompression()),
		kgo.OnPartitionsAssigned(func(_ context.Context, _ *kgo.Client, m map[string][]int32) {
			p.report(map[string]any{"event": "assigned", "partitions": m[topic]})
		}),
	)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := p.ensureTopics(ctx, topic, cfg.prefix+".dlq"); err != nil {
		p.client.Close()
		return err
	}
	err = p.serve(ctx)
	// Leaving the group at once lets the next member take the partitions without waiting
	// for this one's session to expire (a leave is a rebalance: allowed first, or it waits).
	p.client.AllowRebalance()
	p.client.LeaveGroup()
	p.client.Close()
	p.report(map[string]any{"event": "stopped"})
	return err
}

func (p *Participant) ensureTopics(ctx context.Context, names ...string) error {
	req := kmsg.NewPtrCreateTopicsRequest()
	req.TimeoutMillis = 30_000
	for _, name := range names {
		t := kmsg.NewCreateTopicsRequestTopic()
		t.Topic = name
		t.NumPartitions = int32(p.cfg.partitions)
		t.ReplicationFactor = -1 // the broker's default
		req.Topics = append(req.Topics, t)
	}
	resp, err := req.RequestWith(ctx, p.client)
	if err != nil {
		return fmt.Errorf("creating topics: %w", err)
	}
	for _, t := range resp.Topics {
		if err := kerr.ErrorForCode(t.ErrorCode); err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
			return fmt.Errorf("creating topic %s: %w", t.Topic, err)
		}
	}
	return nil
}

func (p *Participant) serve(ctx context.Context) error {
	for {
		fetches := p.client.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if errs := fetches.Errors(); len(errs) > 0 {
			for _, e := range errs {
				fmt.Fprintf(os.Stderr, "participant: fetch %s/%d: %v\n", e.Topic, e.Partition, e.Err)
			}
		}
		var taken []*kgo.Record
		fetches.EachRecord(func(r *kgo.Record) { taken = append(taken, r) })
		received := time.Now()
		for _, r := range taken {
			// Sent and acknowledged before the offset is committed: a crash in between
			// redelivers the command, and the store answers it.
			if err := p.handle(context.Background(), r, received); err != nil {
				return err
			}
		}
		if len(taken) > 0 {
			if err := p.client.CommitRecords(context.Background(), taken...); err != nil {
				return fmt.Errorf("committing offsets: %w", err)
			}
		}
		p.client.AllowRebalance()
	}
}

func (p *Participant) handle(ctx context.Context, r *kgo.Record, received time.Time) error {
	// Never taken from the wire (contract x-saga-sealing.unsealedHeader).
	headers := r.Headers[:0:0]
	for _, h := range r.Headers {
		if h.Key != unsealedHeader {
			headers = append(headers, h)
		}
	}
	r.Headers = headers
	if p.trust != nil {
		if _, why := p.trust.Verify(r); why != nil {
			return p.deadLetter(ctx, r, why.reason, why.detail)
		}
	}
	c, err := decodeCommand(r.Value, 1<<20)
	if err != nil {
		var de *decodeError
		errors.As(err, &de)
		return p.deadLetter(ctx, r, de.reason, de.detail)
	}
	if *c.Service != p.cfg.service {
		return p.deadLetter(ctx, r, "wrong_service", fmt.Sprintf("command for service %q on %q's topic", *c.Service, p.cfg.service))
	}
	handler, ok := p.handlers[*c.Action]
	if !ok {
		return p.deadLetter(ctx, r, "unknown_action", fmt.Sprintf("service %q has no handler for %q", p.cfg.service, *c.Action))
	}
	outcome, replayed, dead, err := p.decide(c, handler, received)
	if err != nil {
		return err
	}
	reply := p.reply(c, outcome)
	value := encode(reply)
	if len(value)+len(r.Key) > p.cfg.maxReplyBytes {
		reply = p.reply(c, smaller(outcome))
		value = encode(reply)
	}
	out := &kgo.Record{Topic: p.cfg.prefix + ".replies", Key: []byte(*c.SagaID), Value: value}
	if tp := childTraceparent(r); tp != "" {
		out.Headers = append(out.Headers, kgo.RecordHeader{Key: "traceparent", Value: []byte(tp)})
	}
	if p.signer != nil {
		p.signer.Sign(out)
	}
	records := []*kgo.Record{out}
	if dead != "" {
		records = append(records, p.deadRecord(r, "redelivered", dead))
	}
	if err := p.client.ProduceSync(ctx, records...).FirstErr(); err != nil {
		return fmt.Errorf("sending the reply: %w", err)
	}
	errType := ""
	if reply.Error != nil {
		errType = reply.Error.Type
	}
	p.report(map[string]any{
		"event": "replied", "saga_id": reply.SagaID, "step": reply.Step, "phase": reply.Phase,
		"action": *c.Action, "attempt": reply.Attempt, "ok": reply.OK, "replayed": replayed,
		"error_type": errType, "output": reply.Output, "partition": out.Partition,
		"idempotency_key": *c.IdempotencyKey, "signed": p.signer != nil,
	})
	return nil
}

// decide applies the reply rules in order: the outcome, whether it is a stored one replayed,
// and the detail of a dead letter to write too (empty: none).
func (p *Participant) decide(c *Command, h Handler, received time.Time) (Outcome, bool, string, error) {
	key := *c.IdempotencyKey
	tried := fmt.Sprintf("%s#attempt-%d", key, *c.Attempt)
	if o, ok := p.store.Get(key); ok {
		return o, true, "", nil
	}
	if o, ok := p.store.Get(tried); ok {
		return o, true, "", nil
	}
	undone := fmt.Sprintf("%s/%s#compensated", *c.SagaID, *c.Step)
	if _, ok := p.store.Get(undone); ok && *c.Phase == "action" {
		return failure("StepFailed", "the step was compensated before this attempt arrived; not run", true, nil), false, "", nil
	}
	budget := *c.DeadlineAt - *c.At
	if c.Budget != nil {
		budget = *c.Budget
	}
	now := unixSeconds(time.Now())
	if age := unixSeconds(received) - *c.At; age > budget+p.cfg.clockSkew {
		o := failure("Expired", fmt.Sprintf("the command was %.1fs old when taken, past its budget of %gs (with %gs allowed for clocks that disagree); not run", age, budget, p.cfg.clockSkew), false, nil)
		return o, false, "", p.store.Put(tried, o)
	}
	if waited := now - unixSeconds(received); waited >= budget {
		o := failure("Expired", fmt.Sprintf("the command waited %.1fs in the participant, its whole budget; not run", waited), false, nil)
		return o, false, "", p.store.Put(tried, o)
	}
	starts, err := p.store.Increment(tried + "#starts")
	if err != nil {
		return Outcome{}, false, "", err
	}
	if starts > p.cfg.maxDeliveries {
		detail := fmt.Sprintf("%s attempt %d: the handler started %d times and never finished (its process died each time, or it was cut off); not run again", key, *c.Attempt, starts-1)
		o := failure("Redelivered", detail, false, nil)
		return o, false, detail, p.store.Put(tried, o)
	}
	left := budget - (unixSeconds(time.Now()) - unixSeconds(received))
	o := p.invoke(c, h, time.Duration(left*float64(time.Second)))
	if o.OK || (o.Error.Business && *c.Phase == "action") {
		err = p.store.Put(key, o)
	} else {
		err = p.store.Put(tried, o)
	}
	if err == nil && o.OK && *c.Phase == "compensation" {
		err = p.store.Put(undone, Outcome{OK: true})
	}
	return o, false, "", err
}

// invoke runs the handler within the budget and classifies what happened.
func (p *Participant) invoke(c *Command, h Handler, budget time.Duration) Outcome {
	ctx := StepContext{SagaID: *c.SagaID, Step: *c.Step, Phase: *c.Phase, Action: *c.Action, Attempt: *c.Attempt, IdempotencyKey: *c.IdempotencyKey}
	p.report(map[string]any{"event": "ran", "saga_id": ctx.SagaID, "step": ctx.Step, "phase": ctx.Phase, "action": ctx.Action, "attempt": ctx.Attempt, "idempotency_key": ctx.IdempotencyKey})
	type result struct {
		out map[string]any
		err error
	}
	done := make(chan result, 1)
	go func() {
		defer func() {
			if v := recover(); v != nil {
				done <- result{nil, &technical{"Panic", fmt.Sprint(v)}}
			}
		}()
		out, err := h(*c.Payload, ctx)
		done <- result{out, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(max(budget, time.Millisecond)):
		return failure("Timeout", "the handler passed the deadline", false, nil)
	}
	var sf *StepFailed
	var te *technical
	switch {
	case errors.As(res.err, &sf):
		return failure("StepFailed", sf.Reason, true, sf.Details)
	case errors.As(res.err, &te):
		return failure(te.kind, te.message, false, nil)
	case res.err != nil:
		return failure("Error", res.err.Error(), false, nil)
	}
	if res.out == nil {
		res.out = map[string]any{}
	}
	// The output replied is what the coordinator will read: JSON, parsed back.
	var parsed map[string]any
	data := encode(res.out)
	if len(data) > p.cfg.maxReplyBytes {
		return failure("OutputTooLarge", fmt.Sprintf("the output is %d bytes of JSON; a reply may take at most %d", len(data), p.cfg.maxReplyBytes), true, nil)
	}
	if err := json.Unmarshal(data, &parsed); err != nil || depth(data) > maxOutputDepth {
		return failure("OutputInvalid", "the output is not a JSON object a reply can carry", true, nil)
	}
	return Outcome{OK: true, Output: parsed}
}

func (p *Participant) reply(c *Command, o Outcome) Reply {
	r := Reply{
		V: schemaVersion, Type: "reply", MessageID: *c.MessageID + "/reply", SagaID: *c.SagaID,
		Step: *c.Step, Phase: *c.Phase, Attempt: *c.Attempt, Service: p.cfg.service,
		OK: o.OK, Error: o.Error, At: unixSeconds(time.Now()),
	}
	if o.OK {
		r.Output = o.Output
	}
	return r
}

// smaller cuts a reply that does not fit (saga.runtime.handlers.smaller).
func smaller(o Outcome) Outcome {
	if o.Error != nil {
		e := *o.Error
		if len(e.Message) > 200 {
			e.Message = e.Message[:200]
		}
		e.Details = map[string]any{}
		return Outcome{Error: &e}
	}
	return failure("OutputTooLarge", "the reply is larger than the participant may send", true, nil)
}

func (p *Participant) deadLetter(ctx context.Context, r *kgo.Record, reason, detail string) error {
	if err := p.client.ProduceSync(ctx, p.deadRecord(r, reason, detail)).FirstErr(); err != nil {
		return fmt.Errorf("writing a dead letter: %w", err)
	}
	p.report(map[string]any{"event": "dead_letter", "reason": reason, "detail": detail, "key": string(r.Key)})
	return nil
}

// deadRecord is the DLQ record of r: its key and value, the reason in headers, then its own
// headers (saga.runtime.dlq.DeadLetter.outgoing).
func (p *Participant) deadRecord(r *kgo.Record, reason, detail string) *kgo.Record {
	if len(detail) > 2000 {
		detail = detail[:2000]
	}
	value := r.Value
	headers := []kgo.RecordHeader{
		{Key: dlqReason, Value: []byte(reason)},
		{Key: dlqDetail, Value: []byte(detail)},
		{Key: dlqSource, Value: fmt.Appendf(nil, "%s/%d/%d", r.Topic, r.Partition, r.Offset)},
	}
	if len(value) > dlqMaxValue {
		sum := sha256.Sum256(value)
		headers = append(headers,
			kgo.RecordHeader{Key: dlqTruncated, Value: fmt.Appendf(nil, "%d", len(value))},
			kgo.RecordHeader{Key: dlqSHA256, Value: []byte(hex.EncodeToString(sum[:]))},
		)
		value = value[:dlqMaxValue]
	}
	return &kgo.Record{Topic: p.cfg.prefix + ".dlq", Key: r.Key, Value: value, Headers: append(headers, r.Headers...)}
}

// childTraceparent is a W3C traceparent for the reply: the command's trace, a new span.
func childTraceparent(r *kgo.Record) string {
	for _, h := range r.Headers {
		if h.Key != "traceparent" {
			continue
		}
		parts := strings.Split(string(h.Value), "-")
		if len(parts) != 4 || len(parts[1]) != 32 || len(parts[2]) != 16 {
			return ""
		}
		span := make([]byte, 8)
		if _, err := rand.Read(span); err != nil {
			return ""
		}
		return fmt.Sprintf("00-%s-%s-%s", parts[1], hex.EncodeToString(span), parts[3])
	}
	return ""
}

func failure(kind, message string, business bool, details map[string]any) Outcome {
	if details == nil {
		details = map[string]any{}
	}
	return Outcome{Error: &ErrorInfo{V: schemaVersion, Type: kind, Message: message, Business: business, Details: details}}
}

func unixSeconds(t time.Time) float64 { return float64(t.UnixMicro()) / 1e6 }

func (p *Participant) report(event map[string]any) {
	p.outMu.Lock()
	defer p.outMu.Unlock()
	_ = p.out.Encode(event)
}

// warehouse is the service's handlers.
func warehouse() map[string]Handler {
	return map[string]Handler{
		"reserve": func(payload map[string]any, ctx StepContext) (map[string]any, error) {
			if payload["reserve_fails"] == true {
				return nil, &StepFailed{Reason: "out of stock", Details: map[string]any{"sku": payload["sku"]}}
			}
			if payload["reserve_flaky"] == true && ctx.Attempt == 1 {
				return nil, &technical{"WarehouseBusy", "the warehouse is busy; try again"}
			}
			return map[string]any{
				"reservation": "res-" + ctx.SagaID,
				"sku":         payload["sku"],
				"qty":         payload["qty"],
				"by":          "go",
				"attempt":     ctx.Attempt,
			}, nil
		},
		"release": func(payload map[string]any, ctx StepContext) (map[string]any, error) {
			// A compensation must be safe when the action never happened (output null).
			var reservation any
			if out, ok := payload["output"].(map[string]any); ok {
				reservation = out["reservation"]
			}
			return map[string]any{"released": reservation, "by": "go"}, nil
		},
	}
}
