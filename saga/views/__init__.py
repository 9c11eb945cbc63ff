"""Views of sagas for people: traces from Jaeger, and views built from the log."""
