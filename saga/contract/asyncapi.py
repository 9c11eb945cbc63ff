"""The AsyncAPI 3.0 document of every topic: names, keys, headers, groups and the rules around them.

What no schema can say is stated here once, from the engine's own constants (topic names from
`saga.runtime.ports.Topics`, header names from `saga.runtime.signing`, `saga.runtime.dlq` and
`saga.runtime.ports`, sealed fields from `saga.adapters.sealing`), so that the document changes
when they do. The rules that are not fields (partitioning, transactions, the reply rules of a
participant, signatures, sealing) are ``x-saga-*`` extensions at the top of the document, in
plain words with the exact bytes where bytes matter, and `saga.contract.vectors` gives a signed
record and a sealed value to check an implementation against.
"""

from __future__ import annotations

from typing import Any

from saga.adapters.sealing import SEALED_FIELDS, UNSEALED_ERROR_HEADER
from saga.contract.vectors import sealing_vector, signing_vector
from saga.core.codec import COMMAND_LIMITS, DEFAULT_LIMITS
from saga.core.replay import CHECKPOINT_PREFIX
from saga.core.wire import SCHEMA_VERSION
from saga.runtime.dlq import (
    DETAIL_HEADER,
    DLQ_MAX_VALUE,
    REASON_HEADER,
    SHA256_HEADER,
    SOURCE_HEADER,
    TRUNCATED_HEADER,
)
from saga.runtime.ports import Topics
from saga.runtime.signing import KEY_ID_HEADER, SIGNATURE_HEADER, SIGNER_HEADER

__all__ = ["ASYNCAPI_VERSION", "KAFKA_BINDING", "asyncapi_document"]

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING = "0.5.0"
"""The version of AsyncAPI's Kafka bindings used."""

_T = Topics("{prefix}")
_REQUESTS = (
    (
        "StartSaga",
        "start",
        "Start a saga (an id names one saga: starting it twice starts it once).",
    ),
    ("CancelSaga", "cancel", "Cancel a saga; honoured until its pivot starts."),
    ("RetrySaga", "retry", "Operator: run a stuck saga's stuck steps again."),
    ("ResolveSaga", "resolve", "Operator: declare a stuck saga's stuck steps handled by hand."),
    ("SignalSaga", "signal", "Deliver a named external event to a running saga."),
    ("DecideApproval", "approval", "An approver's decision on an approval step."),
    ("CompensateSaga", "compensate", "A parent compensating its sub-saga (coordinators only)."),
)


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def _text(description: str) -> dict[str, str]:
    return {"type": "string", "description": description}


def _headers(*names: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A headers schema: each header a UTF-8 string; none required (a reader must not decide
    on an unsigned header, and unsigned mode has no signature headers)."""
    known: dict[str, dict[str, Any]] = {
        "traceparent": _text(
            "W3C trace context (00-<trace id>-<span id>-<flags>). A command's is derived: "
            "trace id = blake2b-128 of 'saga-trace:<saga id>', span id = blake2b-64 of "
            "'<saga id>/<step>/<phase>/<attempt>' (saga.runtime.traceids). A reply should carry "
            "a child of the command's span. Optional, never signed."
        ),
        "tracestate": _text("W3C trace state, passed on unchanged. Optional, never signed."),
        SIGNER_HEADER: _text("The principal that signed the record (signed mode only)."),
        KEY_ID_HEADER: _text("The id of the Ed25519 key that signed it (signed mode only)."),
        SIGNATURE_HEADER: _text(
            "Base64 (standard, padded) of the 64-byte Ed25519 signature over the bytes of "
            "x-saga-signing.signedBytes (signed mode only)."
        ),
    }
    props = {n: known[n] for n in names}
    props.update(extra or {})
    return {"type": "object", "properties": props}


_SIGNED = ("traceparent", "tracestate", SIGNER_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER)


def _message(
    name: str, summary: str, payload: str, headers: str | None, key: str, correlation: bool = True
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": "application/json",
        "payload": _ref(payload),
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": key},
                "bindingVersion": KAFKA_BINDING,
            }
        },
    }
    if headers is not None:
        message["headers"] = _ref(f"#/components/schemas/{headers}")
    if correlation:
        message["correlationId"] = {"location": "$message.payload#/message_id"}
    return message


def _channel(
    address: str,
    description: str,
    messages: list[str],
    *,
    compacted: bool = False,
    parameters: tuple[str, ...] = ("prefix",),
) -> dict[str, Any]:
    binding: dict[str, Any] = {"bindingVersion": KAFKA_BINDING}
    if compacted:
        binding["topicConfiguration"] = {"cleanup.policy": ["compact"]}
    return {
        "address": address,
        "description": description,
        "parameters": {p: _ref(f"#/components/parameters/{p}") for p in parameters},
        "messages": {m: _ref(f"#/components/messages/{m}") for m in messages},
        "bindings": {"kafka": binding},
    }


def _operation(
    action: str,
    channel: str,
    messages: list[str],
    description: str,
    *,
    group: str | None = None,
    reply: tuple[str, list[str]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "action": action,
        "channel": _ref(f"#/channels/{channel}"),
        "description": description,
        "messages": [_ref(f"#/channels/{channel}/messages/{m}") for m in messages],
    }
    if group is not None:
        op["bindings"] = {
            "kafka": {
                "groupId": {"type": "string", "description": f"the consumer group {group}"},
                "bindingVersion": KAFKA_BINDING,
            }
        }
    if reply is not None:
        target, names = reply
        op["reply"] = {
            "channel": _ref(f"#/channels/{target}"),
            "messages": [_ref(f"#/channels/{target}/messages/{m}") for m in names],
        }
    return op


def _channels() -> dict[str, Any]:
    same = (
        "It has as many partitions as {prefix}.requests, {prefix}.replies and {prefix}.log "
        "(x-saga-partitioning)."
    )
    return {
        "requests": _channel(
            _T.requests,
            "Start, cancel, signal, approve and operator requests, from clients (the CLI, the "
            f"API, any service) to the coordinators. Keyed by the saga id. {same}",
            [name for name, _, _ in _REQUESTS],
        ),
        "commands": _channel(
            _T.commands("{service}"),
            "One service's commands: each step's action or compensation, written by the "
            "coordinator inside its transactions, keyed by the saga id. The service's "
            "participants consume it in one consumer group and answer every command on "
            "{prefix}.replies (x-saga-participant).",
            ["Command"],
            parameters=("prefix", "service"),
        ),
        "replies": _channel(
            _T.replies,
            "Participants' outcomes, one reply per command taken (and the stored one again "
            f"for a redelivered command). Keyed by the saga id. {same}",
            ["Reply"],
        ),
        "log": _channel(
            _T.log,
            "The event log, the source of truth: written only by the coordinators, in "
            "transactions, to the partition of the input it decided (that of the saga id). "
            f"Keyed by the saga id; ``seq`` numbers a saga's events from 1 without gaps. {same}",
            ["Event"],
        ),
        "snapshots": _channel(
            _T.snapshots,
            "Compacted. The latest state of each saga, keyed by the saga id (a tombstone when "
            "retention drops it), and one checkpoint per partition keyed "
            f"'{CHECKPOINT_PREFIX.decode()}<partition>', on the partition of the log it "
            "covers.",
            ["Snapshot", "Checkpoint"],
            compacted=True,
        ),
        "alerts": _channel(
            _T.alerts,
            "Stuck sagas, refused messages, approvals waiting, missed deadlines; keyed by the "
            "saga id.",
            ["Alert"],
        ),
        "dlq": _channel(
            _T.dlq,
            "Records that could not be used, set aside by whoever met them: the original key "
            "and value (cut at the size in x-saga-deadLetters), the reason in headers, then "
            "the original headers.",
            ["DeadLetter"],
        ),
        "definitions": _channel(
            _T.definitions,
            "Compacted, one partition. Every saga definition published, keyed "
            "'<name>@<version>'; the first record of a key wins.",
            ["DefinitionRecord"],
            compacted=True,
        ),
    }


def _operations() -> dict[str, Any]:
    requests = [name for name, _, _ in _REQUESTS]
    return {
        "sendRequest": _operation(
            "send",
            "requests",
            requests,
            "A client asks. Signed by the client's principal in signed mode; the coordinator "
            "records the verified signer as the request's `by`.",
        ),
        "receiveRequest": _operation(
            "receive",
            "requests",
            requests,
            "The coordinators consume requests and replies together (range assignor).",
            group=_T.coordinator_group,
        ),
        "sendCommand": _operation(
            "send",
            "commands",
            ["Command"],
            "The coordinator sends each attempt of a step's action or compensation.",
        ),
        "receiveCommand": _operation(
            "receive",
            "commands",
            ["Command"],
            "A participant takes a command and replies (x-saga-participant).",
            group=_T.participant_group("{service}"),
            reply=("replies", ["Reply"]),
        ),
        "sendReply": _operation(
            "send",
            "replies",
            ["Reply"],
            "A participant's outcome, keyed by the saga id; signed by the service's principal in "
            "signed mode.",
        ),
        "receiveReply": _operation(
            "receive",
            "replies",
            ["Reply"],
            "The coordinators take a reply only for the attempt in flight; any other is stale "
            "and changes nothing.",
            group=_T.coordinator_group,
        ),
        "sendEvent": _operation(
            "send", "log", ["Event"], "Only the coordinators write the log, in transactions."
        ),
        "receiveEvent": _operation(
            "receive", "log", ["Event"], "Readers of history (read_committed)."
        ),
        "sendSnapshot": _operation(
            "send", "snapshots", ["Snapshot", "Checkpoint"], "In the same transactions."
        ),
        "receiveSnapshot": _operation(
            "receive", "snapshots", ["Snapshot", "Checkpoint"], "Status tools, recovery."
        ),
        "sendAlert": _operation("send", "alerts", ["Alert"], "In the same transactions."),
        "receiveAlert": _operation("receive", "alerts", ["Alert"], "Alert hooks."),
        "sendDeadLetter": _operation(
            "send", "dlq", ["DeadLetter"], "Whoever meets a record it cannot use."
        ),
        "receiveDeadLetter": _operation("receive", "dlq", ["DeadLetter"], "Operators."),
        "sendDefinition": _operation(
            "send", "definitions", ["DefinitionRecord"], "`saga deploy` and coordinators."
        ),
        "receiveDefinition": _operation(
            "receive", "definitions", ["DefinitionRecord"], "Coordinators, at start-up."
        ),
    }


def _messages() -> dict[str, Any]:
    saga_key = "the saga id, UTF-8"
    found: dict[str, Any] = {}
    for name, _, summary in _REQUESTS:
        found[name] = _message(
            name, summary, f"./schemas/request.json#/$defs/{name}", "SignedHeaders", saga_key
        )
    found["Command"] = _message(
        "Command",
        "A step's action or compensation.",
        "./schemas/command.json",
        "SignedHeaders",
        saga_key,
    )
    found["Reply"] = _message(
        "Reply",
        "A participant's outcome for one command.",
        "./schemas/reply.json",
        "SignedHeaders",
        saga_key,
    )
    found["Event"] = _message(
        "Event",
        "One saga event (a union on `type`).",
        "./schemas/event.json",
        None,
        saga_key,
        correlation=False,
    )
    found["Snapshot"] = _message(
        "Snapshot",
        "The latest state of one saga (`state`: saga-state.json).",
        "./schemas/snapshot-record.json#/$defs/Snapshot",
        None,
        saga_key,
        correlation=False,
    )
    found["Checkpoint"] = _message(
        "Checkpoint",
        "Every event of a log partition before `log_offset` is in the snapshots.",
        "./schemas/snapshot-record.json#/$defs/Checkpoint",
        None,
        f"'{CHECKPOINT_PREFIX.decode()}<partition>'",
        correlation=False,
    )
    found["Alert"] = _message(
        "Alert",
        "Someone should look.",
        "./schemas/alert.json",
        None,
        saga_key,
        correlation=False,
    )
    found["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "DeadLetter",
        "summary": "The original record's bytes, with why it was set aside.",
        "contentType": "application/octet-stream",
        "headers": _ref("#/components/schemas/DeadLetterHeaders"),
        "payload": {
            "description": "The original value, byte for byte (sealed again if it was sealed; "
            f"cut to its first {DLQ_MAX_VALUE} bytes when larger).",
        },
        "bindings": {
            "kafka": {
                "key": {"description": "the original record's key, unchanged"},
                "bindingVersion": KAFKA_BINDING,
            }
        },
    }
    found["DefinitionRecord"] = _message(
        "DefinitionRecord",
        "A published saga definition.",
        "./schemas/definition-record.json",
        None,
        "'<name>@<version>'",
        correlation=False,
    )
    return found


def _components() -> dict[str, Any]:
    return {
        "parameters": {
            "prefix": {
                "description": "The topic name prefix of one deployment (SAGA_PREFIX).",
                "default": "saga",
                "examples": ["saga"],
            },
            "service": {
                "description": "A service name, as the saga definitions' steps name it.",
                "examples": ["payment"],
            },
        },
        "messages": _messages(),
        "schemas": {
            "SignedHeaders": _headers(*_SIGNED),
            "DeadLetterHeaders": _headers(
                extra={
                    REASON_HEADER: _text(
                        "A short, stable reason code: invalid_json, invalid_message, "
                        "unknown_schema_version, too_large, too_deep, wrong_service, "
                        "unknown_action, redelivered, reply_too_large, unauthenticated, "
                        "forbidden, unsealable, ..."
                    ),
                    DETAIL_HEADER: _text("What was wrong, for people (at most 2,000 bytes)."),
                    SOURCE_HEADER: _text("'<topic>/<partition>/<offset>' of the original."),
                    TRUNCATED_HEADER: _text("The original size in bytes, when the value was cut."),
                    SHA256_HEADER: _text("Hex SHA-256 of the original value, when it was cut."),
                }
            ),
        },
    }


def _rules() -> dict[str, Any]:
    """The ``x-saga-*`` extensions: what a producer or consumer in another language must do."""
    return {
        "x-saga-partitioning": {
            "partitioner": "murmur2, as Kafka's Java clients: (murmur2(key) & 0x7fffffff) % "
            "partitions, key = the UTF-8 saga id (franz-go's StickyKeyPartitioner, librdkafka's "
            "murmur2_random, Sarama's NewCustomHashPartitioner(MurmurHash2) agree; librdkafka's "
            "default consistent_random does NOT).",
            "copartitioned": [_T.requests, _T.replies, _T.log, _T.snapshots],
            "rule": "requests, replies, log and snapshots have the same partition count, so that "
            "partition p of each belongs to one coordinator; a coordinator refuses to run on "
            "another count than its checkpoints recorded. Command topics are keyed alike.",
            "assignor": "range (protocol name 'range'): a member of "
            f"{_T.participant_group('{service}')} in another language must offer it, to share "
            "the group with Python participants.",
        },
        "x-saga-transactions": {
            "coordinator": f"one transactional producer per owned partition p, transactional.id "
            f"'{_T.coordinator_group}.<p>': each transaction holds a batch's log events, "
            "commands, alerts, outbox records, sub-saga requests and replies, snapshots, and "
            f"the consumer offsets of group {_T.coordinator_group}.",
            "isolation": "read_committed for every consumer: a command or event of an aborted "
            "transaction must never be acted on.",
            "participants": "an idempotent producer (acks=all, enable.idempotence), not "
            "transactional: the reply is sent and acknowledged first, then the command's "
            "offset committed (at-least-once; the reply store makes it effectively-once).",
            "offsets": "consumers start from the earliest offset and never auto-commit.",
            "compression": "none or gzip: the engine's Python clients (aiokafka) read snappy, "
            "lz4 and zstd batches only with optional libraries, and a coordinator that cannot "
            "decompress a batch stops. Set it explicitly: some clients (franz-go) default to "
            "snappy.",
        },
        "x-saga-idempotency": {
            "key": "Command.idempotency_key = '<saga id>/<step>/<phase>' (for an action after n "
            "operator retries of a stuck step: '<saga id>/<step>/action/r<n>'); the same for "
            "every attempt of one step and phase. Pass it to side effects outside Kafka.",
            "messageIds": "Command.message_id = '<saga id>/<step>/<phase>/<attempt>'; a "
            "reply's message_id = the command's + '/reply'. Requests: a client's choice, unique; "
            "an operator request is answered once per message id.",
            "starts": "StartSaga for an existing saga id follows if_exists: 'return' (default) "
            "keeps it, 'refuse' refuses a different name or input.",
        },
        "x-saga-participant": _participant_rules(),
        "x-saga-signing": {
            "mode": "Unsigned by default (local development). Signed: every request, command "
            "and reply carries the three signature headers; a coordinator takes a reply for "
            "step S only from a principal of S's service, a participant a command only from a "
            "coordinator principal (the policy's `coordinators`).",
            "algorithm": "Ed25519 (RFC 8032, pure), 64-byte signatures.",
            "signedBytes": "'saga-engine/record-signature/v1' 0x00, then five fields: signer, "
            "key id, topic (UTF-8), record key, record value (the bytes on the wire: sealed "
            "before signed). Each field is 0x00 when absent (a null key or value), else 0x01, "
            "its length as 4 bytes big-endian, and its bytes.",
            "notSigned": "partition, timestamp and every other header (trace context): never "
            "decide on them.",
            "keyFile": "JSON {saga_signing_key: 1, algorithm: ed25519, principal, key_id, "
            "private_key: base64 of the 32-byte seed, public_key: base64 of the 32-byte key}.",
            "keyring": "YAML {version: 1, keys: {<key id>: {principal, public_key}}}.",
            "verify": "find the key id in the keyring, check the signer header is its "
            "principal, check the signature; a duplicate signature header is malformed. Refused "
            "records go to the DLQ with reason 'unauthenticated' or 'forbidden'.",
            "testVector": signing_vector(),
        },
        "x-saga-sealing": {
            "fields": sorted(SEALED_FIELDS),
            "rule": "when payloads are sealed, every JSON object under one of these keys, at any "
            "depth of a record's value, is replaced by a SealedValue (schemas/sealed-value.json)"
            "; nothing inside a sealed value is sealed again. Opening gives back the compact "
            "JSON that was sealed.",
            "cipher": "AES-256-GCM, 12-byte random nonce, associated data = the record key (the "
            "saga id), plaintext = the object's compact JSON.",
            "keyFile": 'JSON {"current": "<kid>", "keys": {"<kid>": "<base64 of 32 bytes>"}} '
            "(SAGA_PAYLOAD_KEYS).",
            "unsealedHeader": f"'{UNSEALED_ERROR_HEADER}' is set by a reader's transport on a "
            "record it could not open, never taken from the wire: strip any that arrives, and "
            "dead-letter such a record with reason 'unsealable'.",
            "testVector": sealing_vector(),
        },
        "x-saga-limits": {
            "foreignMaxBytes": DEFAULT_LIMITS.max_bytes,
            "foreignMaxDepth": DEFAULT_LIMITS.max_depth,
            "commandMaxDepth": COMMAND_LIMITS.max_depth,
            "rule": "records are JSON objects, UTF-8, with a known `v`; unknown fields are "
            "rejected (a record that fails goes to the DLQ, never stalls a partition). Replies "
            "are read with the foreign bounds: a reply's output may nest at most "
            f"{DEFAULT_LIMITS.max_depth - 1} levels.",
        },
        "x-saga-deadLetters": {
            "maxValue": DLQ_MAX_VALUE,
            "headers": [
                REASON_HEADER,
                DETAIL_HEADER,
                SOURCE_HEADER,
                TRUNCATED_HEADER,
                SHA256_HEADER,
            ],
        },
    }


def _participant_rules() -> dict[str, Any]:
    """How a participant answers a command (`saga.runtime.outcomes`), in order."""
    key, tried = "<idempotency_key>", "<idempotency_key>#attempt-<attempt>"
    return {
        "group": _T.participant_group("{service}"),
        "before": "a command whose signature fails, whose JSON does not decode, whose `service` "
        "is another service's or whose `action` has no handler is not run: it goes to the DLQ "
        "(reasons unauthenticated/forbidden, invalid_message..., wrong_service, "
        "unknown_action) and gets no reply.",
        "rules": [
            f"1. An outcome stored under '{key}' or '{tried}' is replied again; the handler "
            "does not run.",
            "2. An action whose step has a compensation marker ('<saga id>/<step>#compensated') "
            "is answered ok=false, error {type: StepFailed, business: true} without running and "
            "without storing.",
            "3. budget = command.budget, or deadline_at - at when null. If (now - at) > budget "
            "+ clock_skew (30 s by default), or the command waited its whole budget inside the "
            "participant, answer {type: Expired, business: false} and store it under "
            f"'{tried}'.",
            f"4. Count the start under '{tried}#starts' (durably, before running); past "
            "max_deliveries (5) starts with no outcome, answer {type: Redelivered, business: "
            f"false}}, store it under '{tried}' and dead-letter the command (reason "
            "'redelivered').",
            "5. Run the handler within the budget (timed out: {type: Timeout}). A success or an "
            f"action's business failure is stored under '{key}' (final for the step); any "
            f"other failure under '{tried}' (a retry, a new attempt, runs again). A "
            "compensation's success also stores the compensation marker.",
        ],
        "reply": "Reply {v: 1, type: reply, message_id: <command's>/reply, saga_id, step, "
        "phase, attempt (the command's), service (this service), ok, output (a JSON object when "
        "ok, else null; an action with no output replies {}), error (ErrorInfo when not ok, "
        "else null), at (this participant's clock, seconds since the epoch)}, keyed by the "
        f"saga id, on {_T.replies}.",
        "compensationPayload": "{input: <the action's input>, output: <its output, or null when "
        "it never succeeded (timed out)>}: a compensation must be safe when the action never "
        "happened.",
        "errors": "business=true (StepFailed, OutputInvalid, OutputTooLarge): not retried, the "
        "saga compensates. business=false (any other type): retried by the step's policy.",
    }


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the engine's topics."""
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "saga-engine wire contract",
            "version": str(SCHEMA_VERSION),
            "description": "The topics of one saga-engine deployment, and what travels on them. "
            "The message schemas are in ./schemas (generated from the engine's pydantic models "
            "by `saga contract`); the rules that are not fields are the x-saga-* extensions "
            "below. `info.version` is the wire schema version, the `v` of every message.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:9092",
                "protocol": "kafka",
                "description": "`make kafka-up`: PLAINTEXT; `make kafka-up SECURE=1`: SASL_SSL "
                "with SCRAM and ACLs on the same port.",
            }
        },
        "channels": _channels(),
        "operations": _operations(),
        "components": _components(),
        **_rules(),
    }
