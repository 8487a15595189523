"""mem-exporter: per-process-group memory and GPU gauges for Prometheus, and an enforcer that kills runaway groups."""

__version__ = "0.1.0"
