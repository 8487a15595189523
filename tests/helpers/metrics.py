"""Reading series out of an exposition text."""

from __future__ import annotations


def metric_value(text: str, name: str, **labels) -> float | None:
    """The value of one series in an exposition text, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None
