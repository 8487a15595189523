"""What the tests share besides fixtures (those live in tests/conftest.py).

- paths: the repository root, the fixtures, tests/hog.py
- waiting: wait_for, until a condition holds
- processes: pid_alive, is_hog, Spawned (a process group a test started)
- net: free_port, http_get
- metrics: metric_value, one series from an exposition text
- daemons: Daemon (`python -m mem_exporter ...` as a child), serve_logging, run_to_the_kill
- tools: where the external programs are (promtool, prometheus, amtool, ...)
- golden: /metrics held against golden files, linted by promtool
- procfs_builder, sysfs_builder: synthetic /proc and /sys trees
- alertmanager: a real Alertmanager and a webhook receiver
- deploy: the deploy tests' paths, metric names, rules and dashboards

tests/ is on sys.path (pyproject.toml: pytest's `pythonpath`), so a test imports `from helpers.waiting import wait_for`.
"""
