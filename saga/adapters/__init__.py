"""Adapters for the runtime's ports: Kafka (aiokafka), in-memory, and OpenTelemetry."""
