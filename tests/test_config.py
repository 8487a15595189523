"""Config: units, validation errors (one line naming file and key), check-config, the shipped schema."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from mem_exporter.config import ConfigError, json_schema, load_config, validate_config
from mem_exporter.units import parse_duration, parse_ratio, parse_size

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("800MB", 800_000_000),
        ("1.5GiB", 1536 * 1024**2),
        ("1024", 1024),
        (2048, 2048),
        ("10 KiB", 10240),
        ("1gb", 10**9),
        ("0", 0),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("2s", 2.0), ("500ms", 0.5), ("1.5m", 90.0), ("1h", 3600.0), (3, 3.0)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text,expected", [("10%", 0.1), (0.25, 0.25), ("0.5", 0.5)])
def test_ratios(text, expected):
    assert parse_ratio(text) == pytest.approx(expected)


BAD = [
    # (yaml text, expected problem line after "FILE: ")
    ("interval: fast\n", "interval: 'fast' is not a duration (examples: 2s, 500ms, 1m)"),
    ("interval: 0\n", "interval: Input should be greater than or equal to 0.05 (got 0.0)"),
    ("interval: 1e-300\n", "interval: Input should be greater than or equal to 0.05 (got 1e-300)"),
    ("interval: .inf\n", "interval: inf: a duration must be a finite number of seconds"),
    ("web: {timeout: 1e-300}\n", "web.timeout: Input should be greater than or equal to 0.1 (got 1e-300)"),
    ("gpu: {retry_max: 0s}\n", "gpu.retry_max: Input should be greater than or equal to 0.1 (got 0.0)"),
    ("intervall: 2s\n", "intervall: unknown key"),
    ("memory: uss\n", "memory: Input should be 'rss' or 'pss' (got 'uss')"),
    ("listen: 9713\n", "listen: Input should be a valid string (got 9713)"),
    ("listen: localhost\n", "listen: 'localhost' is not HOST:PORT (example: 127.0.0.1:9713)"),
    ("groups: {by: pod}\n", "groups.by: Input should be 'pgid', 'cgroup' or 'container' (got 'pod')"),
    ("groups: {max_groups: 0}\n", "groups.max_groups: Input should be greater than or equal to 1 (got 0)"),
    (
        "groups: {min_memory: 10XB}\n",
        "groups.min_memory: '10XB': unknown size unit 'xb' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
    ),
    (
        "groups: {named: [{name: a, match: {comm: '(unclosed'}}]}\n",
        "groups.named[0].match.comm: bad regular expression '(unclosed': "
        "missing ), unterminated subpattern at position 0",
    ),
    (
        "groups: {named: [{name: a, match: {}}]}\n",
        "groups.named[0]: match needs at least one of comm, exe, cmdline, user",
    ),
    (
        "groups: {named: [{name: other, match: {comm: x}}]}\n",
        "groups.named[0].name: 'other' is reserved for the groups beyond max_groups",
    ),
    (
        "groups: {named: [{name: a, match: {comm: x}}, {name: a, match: {comm: y}}]}\n",
        "groups: named group names must be unique; repeated: a",
    ),
    ("groups: {named: [{name: a, match: {cmd: x}}]}\n", "groups.named[0].match.cmd: unknown key"),
    (
        "gpu: {backend: cuda}\n",
        "gpu.backend: String should match pattern '^(auto|nvml|drm|none|fake:.+)$' (got 'cuda')",
    ),
    (
        "enforcer: {rules: [{name: r}]}\n",
        "enforcer.rules[0]: a rule needs exactly one condition of max_rss, max_pss, max_footprint, "
        "max_private, max_gpu_memory, gpu_memory_above, "
        "system_available_below, memory_pressure_above, system_pressure_level; got none",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, max_gpu_memory: 1GB}]}\n",
        "enforcer.rules[0]: a rule needs exactly one condition of max_rss, max_pss, max_footprint, "
        "max_private, max_gpu_memory, gpu_memory_above, "
        "system_available_below, memory_pressure_above, system_pressure_level; got max_rss, max_gpu_memory",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: -5MB}]}\n",
        "enforcer.rules[0].max_rss: '-5MB' is not a size (examples: 800MB, 1.5GiB, 1048576)",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, signals: [SIGTERM, SIGBOGUS]}]}\n",
        "enforcer.rules[0].signals[1]: unknown signal 'SIGBOGUS'",
    ),
    (
        "enforcer: {rules: [{name: r, gpu_memory_above: 120%}]}\n",
        "enforcer.rules[0].gpu_memory_above: '120%' is outside 0..1 (0%..100%)",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, for: soon}]}\n",
        "enforcer.rules[0].for: 'soon' is not a duration (examples: 2s, 500ms, 1m)",
    ),
    ("enforcer: {rules: [{name: r, max_pss: 1GB}]}\n", "enforcer.rules[0].max_pss: needs `memory: pss`"),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB}, {name: r, max_rss: 2GB}]}\n",
        "enforcer: rule names must be unique; repeated: r",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 0, match: {all: true}}]}\n",
        "enforcer.rules[0].max_rss: must be above 0, got 0",
    ),
    (
        "enforcer: {rules: [{name: r, gpu_memory_above: 0%, match: {all: true}}]}\n",
        "enforcer.rules[0].gpu_memory_above: must be above 0, got 0",
    ),
    (
        "enforcer: {rules: [{name: r, system_available_below: 0, match: {all: true}}]}\n",
        "enforcer.rules[0].system_available_below: must be above 0, got 0",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB}]}\n",
        "enforcer.rules[0].match: say which groups rule 'r' watches, e.g. match: {cmdline: 'bun test'}, "
        "or match: {all: true} for every group",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, match: {}}]}\n",
        "enforcer.rules[0].match: say which groups rule 'r' watches, e.g. match: {cmdline: 'bun test'}, "
        "or match: {all: true} for every group",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, match: {all: true, comm: x}}]}\n",
        "enforcer.rules[0].match: `all: true` selects every group: give it alone, or drop it and keep the regexes",
    ),
    ("enforcer: {event_log_max_size: 0}\n", "enforcer.event_log_max_size: Input should be greater than 0 (got 0)"),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, match: {group: '[x'}}]}\n",
        "enforcer.rules[0].match.group: bad regular expression '[x': unterminated character set at position 0",
    ),
    (
        "enforcer: {enabled: maybe}\n",
        "enforcer.enabled: Input should be a valid boolean, unable to interpret input (got 'maybe')",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: .inf, match: {all: true}}]}\n",
        "enforcer.rules[0].max_rss: inf: a size must be a finite number of bytes",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1e400, match: {all: true}}]}\n",
        "enforcer.rules[0].max_rss: '1e400': a size must be a finite number of bytes",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, grace: -5, match: {all: true}}]}\n",
        "enforcer.rules[0].grace: -5: a duration cannot be negative",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, cooldown: -1, match: {all: true}}]}\n",
        "enforcer.rules[0].cooldown: -1: a duration cannot be negative",
    ),
    (
        "enforcer: {rules: [{name: r, max_rss: 1GB, for: .nan, match: {all: true}}]}\n",
        "enforcer.rules[0].for: nan: a duration must be a finite number of seconds",
    ),
    ("- just\n- a list\n", "(top level): must be a mapping of keys, got list"),
    ("interval: [2s\n", "line 2 column 1: YAML syntax error: expected ',' or ']', but got '<stream end>'"),
]


@pytest.mark.parametrize("text,problem", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_config_is_one_clear_line(tmp_path, text, problem):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    where = "" if problem.startswith(("(top level)", "line ")) else "line 1: "  # each text above is one line
    assert e.value.problems == [f"{f}: {where}{problem}"]


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    """A second `enforcer:` used to replace the first in silence: rules gone, `check-config` said ok."""
    f = tmp_path / "twice.yaml"
    f.write_text(
        "enforcer:\n  rules:\n    - {name: r, max_rss: 1GB, match: {all: true}}\n"
        "interval: 2s\nenforcer:\n  dry_run: true\n"
    )
    r = run_cli("check-config", str(f))
    assert (r.returncode, r.stdout.splitlines()) == (
        2,
        [f"{f}: line 5 column 1: enforcer: duplicate key (first given on line 1)"],
    )
    f.write_text("enforcer: {rules: [{name: r, max_rss: 1GB, grace: 1s, grace: 9s, match: {all: true}}]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert e.value.problems == [f"{f}: line 1 column 55: grace: duplicate key (first given on line 1)"]


def test_a_merge_may_still_override_keys(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text(
        "x-rule: &base {max_rss: 1GB, grace: 1s, match: {all: true}}\n"
        "enforcer:\n  rules:\n    - <<: *base\n      name: r\n      grace: 2s\n"
    )
    with pytest.raises(ConfigError) as e:  # x-rule is no key of ours, but the merge itself was accepted
        load_config(f)
    assert e.value.problems == [f"{f}: line 1: x-rule: unknown key"]


def test_problems_name_the_line_of_their_key(tmp_path):
    f = tmp_path / "lines.yaml"
    f.write_text(
        "interval: 2s\nenforcer:\n  rules:\n    - name: r\n      match: {cmdline: x}\n      max_rss: 1GB\n"
        "      grace: -5\n      cooldown: -1\n      for: .nan\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert sorted(e.value.problems) == [
        f"{f}: line 7: enforcer.rules[0].grace: -5: a duration cannot be negative",
        f"{f}: line 8: enforcer.rules[0].cooldown: -1: a duration cannot be negative",
        f"{f}: line 9: enforcer.rules[0].for: nan: a duration must be a finite number of seconds",
    ]


@pytest.mark.parametrize(
    "content,problem",
    [
        (bytes(range(128, 256)), "not a text file (byte 0 is not UTF-8)"),
        (b"interval: 2s\x00\x01", "not a text file (character #x0000 at 12)"),
    ],
)
def test_a_binary_file_is_named_in_its_error(tmp_path, content, problem):
    f = tmp_path / "binary.yaml"
    f.write_bytes(content)
    r = run_cli("check-config", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"{f}: {problem}"]


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_config_that_is_not_a_small_regular_file_is_one_line_at_once(tmp_path, kind):
    """A FIFO blocked check-config (and a reload) until someone wrote to it; /dev/zero read until memory
    ran out. Both are refused on sight, as is a file far larger than any config."""
    if kind == "fifo":
        f = tmp_path / "config.yaml"
        os.mkfifo(f)
        problem = "cannot read: not a regular file (a FIFO)"
    elif kind == "device":
        f = Path("/dev/zero")
        problem = "cannot read: not a regular file (a character device)"
    else:
        f = tmp_path / "config.yaml"
        with open(f, "wb") as out:
            out.write(b"interval: 2s\n" + b"#" * (5 << 20) + b"\n")
        problem = "larger than 4 MiB: not a config file"
    r = subprocess.run(
        [sys.executable, "-m", "mem_exporter", "check-config", str(f)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"{f}: {problem}"]


def test_a_config_behind_a_symlink_is_read(tmp_path):
    """A Kubernetes ConfigMap mounts the file as a chain of symlinks to a regular file."""
    real = tmp_path / "data" / "config.yaml"
    real.parent.mkdir()
    real.write_text("interval: 3s\n")
    (tmp_path / "config.yaml").symlink_to(real)
    assert load_config(tmp_path / "config.yaml").interval == 3


def test_check_config_turns_any_validation_failure_into_one_line(tmp_path):
    """An exception no validator expected (here a size that overflowed into OverflowError) is still one line."""
    f = tmp_path / "inf.yaml"
    f.write_text("enforcer:\n  rules:\n    - {name: r, max_rss: .inf, match: {all: true}}\n")
    r = run_cli("check-config", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        f"{f}: line 3: enforcer.rules[0].max_rss: inf: a size must be a finite number of bytes"
    ]


def test_every_problem_is_reported(tmp_path):
    f = tmp_path / "two.yaml"
    f.write_text("interval: x\nmemory: y\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert len(e.value.problems) == 2


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert e.value.problems == [f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory"]


def test_empty_file_means_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    c = load_config(f)
    assert c.interval == 2.0 and c.listen == "0.0.0.0:9713" and c.groups.max_groups == 50


def test_overrides_win_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("listen: 127.0.0.1:1\npaths: {procfs: /x}\n")
    c = load_config(f, {"listen": "127.0.0.1:2", "paths.procfs": "/host/proc", "gpu.backend": None})
    assert (c.listen, c.paths.procfs, c.gpu.backend) == ("127.0.0.1:2", "/host/proc", "auto")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mem_exporter", *args], capture_output=True, text=True, cwd=ROOT)


def test_check_config_ok_and_bad(tmp_path):
    ok = run_cli("check-config", "config.example.yaml")
    assert (ok.returncode, ok.stdout) == (0, "ok\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("interval: fast\ngroups: {max_groups: -1}\n")
    r = run_cli("check-config", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert r.stdout.splitlines() == [
        f"{bad}: line 1: interval: 'fast' is not a duration (examples: 2s, 500ms, 1m)",
        f"{bad}: line 2: groups.max_groups: Input should be greater than or equal to 1 (got -1)",
    ]


def test_check_config_refuses_a_zero_limit_that_would_select_everything(tmp_path):
    """The reproduced case: `max_rss: 0` and no match listed every group of the user as a victim."""
    bad = tmp_path / "zero.yaml"
    bad.write_text("enforcer:\n  rules:\n    - name: oops\n      max_rss: 0\n")
    r = run_cli("check-config", str(bad))
    assert r.returncode == 2 and r.stdout.splitlines() == [
        f"{bad}: line 4: enforcer.rules[0].max_rss: must be above 0, got 0"
    ]
    bad.write_text("enforcer:\n  rules:\n    - name: oops\n      max_rss: 1GB\n")
    r = run_cli("check-config", str(bad))
    assert r.returncode == 2 and r.stdout.splitlines() == [
        f"{bad}: line 3: enforcer.rules[0].match: say which groups rule 'oops' watches, "
        "e.g. match: {cmdline: 'bun test'}, or match: {all: true} for every group"
    ]


def test_serve_refuses_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory: uss\n")
    r = run_cli("serve", "--config", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip() == f"mem-exporter: {bad}: line 1: memory: Input should be 'rss' or 'pss' (got 'uss')"


def test_example_documents_every_key():
    """Every key of the schema appears in config.example.yaml, which itself validates."""
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    load_config(ROOT / "config.example.yaml")
    schema = json_schema()

    def keys(node, defs, prefix=""):
        if "$ref" in node:
            node = defs[node["$ref"].split("/")[-1]]
        for choice in node.get("anyOf", []):
            yield from keys(choice, defs, prefix)
        if node.get("type") == "array" and "items" in node:
            yield from keys(node["items"], defs, prefix + "[]")
        for k, v in node.get("properties", {}).items():
            yield prefix + k
            yield from keys(v, defs, prefix + k + ".")

    def present(data, prefix=""):
        if isinstance(data, dict):
            for k, v in data.items():
                yield prefix + k
                yield from present(v, prefix + k + ".")
        elif isinstance(data, list):
            for item in data:
                yield from present(item, prefix + "[]")

    text = (ROOT / "config.example.yaml").read_text()
    # a key is documented when it is set in the example or named in its comments (the matcher keys)
    missing = {
        k
        for k in set(keys(schema, schema["$defs"])) - set(present(example))
        if not re.search(rf"\b{re.escape(k.split('.')[-1].lstrip('[]'))}\b", text)
    }
    assert not missing, f"config.example.yaml does not document: {sorted(missing)}"


def test_shipped_schema_is_current_and_validates_the_example():
    shipped = json.loads((ROOT / "mem_exporter" / "config.schema.json").read_text())
    assert shipped == json_schema(), "run: mem-exporter schema > mem_exporter/config.schema.json"
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    jsonschema.validate(example, shipped)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"interval": "2s", "bogus": 1}, shipped)


def test_zones_default_per_resource_and_reject_caution_above_critical():
    zones = validate_config({}).zones
    assert (zones.system_memory.caution, zones.system_memory.critical) == (0.85, 0.90)
    assert (zones.gpu_memory.caution, zones.gpu_memory.critical) == (0.67, 0.83)
    with pytest.raises(ConfigError) as e:
        validate_config({"zones": {"gpu_memory": {"caution": "90%", "critical": "80%"}}}, "lab.yaml")
    assert e.value.problems == ["lab.yaml: zones.gpu_memory: caution (0.9) must be below critical (0.8)"]
