"""OpenTelemetry traces (stub)."""

ENABLED = False


def request_spans(ctx) -> None:
    pass
