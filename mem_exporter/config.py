"""The one configuration schema shared by every command, validated with pydantic.

`load_config(path)` returns a `Config` or raises `ConfigError`, whose `problems`
are one-line messages naming the file, the key path and what is wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .config_types import Duration, Ratio, Size
from .enforcer import conditions
from .facilities import SourceChoice
from .signals import signal_number
from .units import parse_size, read_yaml_lines

DEFAULT_PORT = 9713
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
MIN_INTERVAL = 0.05  # seconds; the fast lanes react between samples, a shorter interval only burns CPU


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"bad regular expression {value!r}: {e}") from None
    return value


def _signal_name(value: str) -> str:
    name = str(value).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if signal_number(name) is None:
        raise ValueError(f"unknown signal {value!r}")
    return name


def _listen(value: str) -> str:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (example: 127.0.0.1:{DEFAULT_PORT})")
    return value


Regex = Annotated[str, AfterValidator(_regex)]
SignalName = Annotated[str, AfterValidator(_signal_name)]
Listen = Annotated[str, AfterValidator(_listen)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Matcher(_Strict):
    """Regexes (searched, not anchored) that must all match one process."""

    comm: Regex | None = Field(None, description="regex on the process name (/proc/PID/comm)")
    exe: Regex | None = Field(None, description="regex on the executable path")
    cmdline: Regex | None = Field(None, description="regex on the command line, arguments joined by spaces")
    user: Regex | None = Field(None, description="regex on the user name (or numeric uid)")
    _compiled: dict = PrivateAttr(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        self._compiled.update(
            {k: re.compile(v) for k in ("comm", "exe", "cmdline", "user") if (v := getattr(self, k)) is not None}
        )

    @property
    def is_empty(self) -> bool:
        return not self._compiled

    @property
    def needs_exe(self) -> bool:
        return "exe" in self._compiled

    def matches(self, comm: str, cmdline: str = "", exe: str | None = None, user: str = "") -> bool:
        values = {"comm": comm, "cmdline": cmdline, "exe": exe or "", "user": user}
        return all(rx.search(values[k]) for k, rx in self._compiled.items())


class ProtectMatcher(Matcher):
    """A `protect:` entry: Matcher's regexes, and `cgroup` on the process's cgroup path."""

    cgroup: Regex | None = Field(
        None,
        description="regex on the cgroup path (as `groups.by: cgroup` names it); only a cgroup that root alone "
        "owns and may write counts, since no user can move a process into one",
    )

    @property
    def cgroup_regex(self) -> re.Pattern | None:
        return None if self.cgroup is None else re.compile(self.cgroup)

    @model_validator(mode="after")
    def _not_empty(self):
        if self.is_empty and self.cgroup is None:
            raise ValueError("a protect entry needs at least one of comm, exe, cmdline, user, cgroup")
        return self


class NamedGroup(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]+$", description="the group label; letters, digits, _ . : -")
    match: Matcher

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v == "other":
            raise ValueError("'other' is reserved for the groups beyond max_groups")
        return v

    @model_validator(mode="after")
    def _match_not_empty(self):
        if self.match.is_empty:
            raise ValueError("match needs at least one of comm, exe, cmdline, user")
        return self


class Groups(_Strict):
    by: Literal["pgid", "cgroup", "container"] = Field(
        "pgid",
        description="what makes a group: process group id, cgroup path, or container (container, pod or "
        "systemd service; other processes keep their PGID group)",
    )
    named: list[NamedGroup] = Field(default_factory=list, description="named groups by regex; first match wins")
    max_groups: int = Field(
        50, ge=1, le=10000, description='most group series exported; the rest sum into group="other"'
    )
    min_memory: Size = Field(parse_size("10MB"), description='smaller groups are summed into group="other"')
    top_processes: int = Field(5, ge=1, le=1000, description="largest members kept per group for logs and events")
    memory_from: Literal["auto", "processes"] = Field(
        "auto",
        description="by: cgroup | container: auto reads each cgroup's own memory accounts where the host has "
        "them (docs/containers.md: which number); processes: sum every process's RSS each interval",
    )
    cmdline_label: bool = Field(
        False, description="add a `cmdline` label to group_info (command lines may hold secrets)"
    )

    @model_validator(mode="after")
    def _unique_names(self):
        names = [g.name for g in self.named]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"named group names must be unique; repeated: {', '.join(dupes)}")
        return self


class Gpu(_Strict):
    backend: str = Field(
        "auto",
        pattern=r"^(auto|nvml|drm|none|fake:.+)$",
        description="auto (NVML for NVIDIA cards, DRM for amdgpu/i915/xe) | nvml | drm | none "
        "| fake:FILE (a YAML scenario)",
    )
    retry_max: Duration = Field(60.0, ge=0.1, description="longest wait between retries after a GPU error")


class RuleMatch(Matcher):
    group: Regex | None = Field(None, description="regex on the group label")
    all_members: bool = Field(False, description="require every member (not any member) to match comm/exe/cmdline/user")
    every_group: bool = Field(
        False,
        alias="all",
        description="`all: true`: the rule watches every group (alone; "
        "written on purpose, never implied by an empty match)",
    )

    @model_validator(mode="after")
    def _all_alone(self):
        if self.every_group and not self.is_empty or self.every_group and self.group is not None:
            raise ValueError("`all: true` selects every group: give it alone, or drop it and keep the regexes")
        return self


class _RuleHead(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]+$")
    match: RuleMatch = Field(
        default_factory=RuleMatch,
        description="which groups the rule watches (required in a config file; `{all: true}` for every group)",
    )


if TYPE_CHECKING:

    class _RuleConditions(_RuleHead):
        """What the type checker knows of the conditions' keys: a rule takes them (and a condition's
        class reads its value: conditions.Condition.value)."""

        model_config = ConfigDict(extra="allow")

else:  # one optional key per rule condition, in enforcer/conditions.py's order (its type, checks, description)
    _RuleConditions = create_model(
        "_RuleConditions", __base__=_RuleHead, **{c.field: c.config_field() for c in conditions.ALL}
    )


class Rule(_RuleConditions):
    for_: Duration = Field(0.0, alias="for", description="how long the condition must hold before acting")
    grace: Duration = Field(5.0, description="wait between the first and the last signal")
    signals: list[SignalName] = Field(
        ["SIGTERM", "SIGKILL"], min_length=1, description="signals in order; the last is sent after the grace period"
    )
    cooldown: Duration = Field(
        30.0,
        description="no second kill by this rule within this time (per group for "
        "max_rss, max_pss, max_gpu_memory; per card for gpu_memory_above)",
    )
    hard_ceiling: Ratio = Field(
        0.10, description="during the grace period, a group this far over its limit is killed at once"
    )
    other_users: bool = Field(False, description="may kill processes of users other than the enforcer's own")

    CONDITIONS: ClassVar[tuple[str, ...]] = tuple(c.field for c in conditions.ALL)

    @property
    def condition(self) -> str:
        return next(c for c in self.CONDITIONS if getattr(self, c) is not None)

    @model_validator(mode="after")
    def _one_condition(self):
        given = [c for c in self.CONDITIONS if getattr(self, c) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a rule needs exactly one condition of {', '.join(self.CONDITIONS)}; "
                f"got {', '.join(given) if given else 'none'}"
            )
        return self


class Notify(_Strict):
    alertmanager_url: str | None = Field(None, description="POST kill events to this Alertmanager (base URL)")
    webhook_url: str | None = Field(None, description="POST kill events as JSON to this URL")
    desktop: bool = Field(False, description="show a desktop notification (notify-send / osascript)")


class EnforcerConfig(_Strict):
    enabled: bool = Field(False, description="run the enforcer inside `serve`; `enforce` always runs it")
    dry_run: bool = Field(False, description="log what would be killed, kill nothing")
    event_log: str | None = Field(None, description="append one JSON line per action to this file")
    event_log_max_size: Size = Field(16 * 2**20, gt=0, description="the event log rotates at this size")
    event_log_keep: int = Field(
        3, ge=0, le=100, description="rotated event logs kept (NAME.1 ... NAME.N); the oldest is deleted"
    )
    protect: list[ProtectMatcher] = Field(
        default_factory=list, description="never signal processes matching these (added to the built-in list)"
    )
    rules: list[Rule] = Field(default_factory=list)
    notify: Notify = Field(default_factory=Notify)
    mlock: bool = Field(
        True,
        description="lock the enforcer's memory (mlockall) so its kill path never waits on "
        "swap; needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK",
    )
    oom_score_adj: int = Field(
        -900,
        ge=-1000,
        le=1000,
        description="the enforcer's own oom_score_adj, so the kernel "
        "OOM killer spares it; lowering needs CAP_SYS_RESOURCE",
    )
    walk_interval: Duration = Field(
        300.0,
        ge=0,
        le=86400,
        description="`enforce` reads every process this often when its rules do not need it each interval "
        "(docs/enforcer.md: what it reads instead); its group metrics are this old at most. "
        "0: every interval, as `serve` does (so do group rules without process events)",
    )
    process_events: Literal["auto", "off"] = Field(
        "auto",
        description="learn of new processes from the kernel's proc connector (root on the host), "
        "else by listing procfs; off: always list",
    )

    @model_validator(mode="after")
    def _unique_rules(self):
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique; repeated: {', '.join(dupes)}")
        return self


class Zone(_Strict):
    caution: Ratio = Field(description="from this share of the capacity on: caution")
    critical: Ratio = Field(description="above this share of the capacity: critical")

    @model_validator(mode="after")
    def _ordered(self):
        if not self.caution < self.critical:
            raise ValueError(f"caution ({self.caution:g}) must be below critical ({self.critical:g})")
        return self


class Zones(_Strict):
    """Safe / caution / critical per resource; used by the report, `top`, `run -v` (docs/deploy.md#zones)."""

    system_memory: Zone = Field(Zone(caution=0.85, critical=0.90), description="share of system RAM in use")
    gpu_memory: Zone = Field(Zone(caution=0.67, critical=0.83), description="share of a card's memory in use")
    limit: Zone = Field(Zone(caution=0.67, critical=0.83), description="share of a group's enforcer limit")


class Paths(_Strict):
    procfs: str = Field("/proc", description="procfs mount point (like node_exporter's --path.procfs)")
    cgroupfs: str = Field("/sys/fs/cgroup", description="cgroup filesystem mount point")
    sysfs: str = Field("/sys", description="sysfs mount point (like node_exporter's --path.sysfs): DRM GPU cards")


class Web(_Strict):
    config_file: str | None = Field(
        None,
        description="exporter-toolkit web config (TLS, basic auth) for every endpoint; --web.config.file overrides it",
    )
    max_connections: int = Field(100, ge=1, le=10000, description="open HTTP connections at most; beyond, answered 503")
    timeout: Duration = Field(10.0, ge=0.1, description="a client idle this long in the middle of a request is dropped")


class Config(_Strict):
    interval: Duration = Field(2.0, ge=MIN_INTERVAL, le=3600, description="normal sampling interval")
    source: SourceChoice = Field(
        "auto",
        description="where process data comes from: procfs (Linux), psutil (macOS, Windows, or forced), "
        "auto: procfs where paths.procfs exists, psutil elsewhere",
    )
    memory: Literal["rss", "pss"] = Field(
        "rss", description="which memory counts for ranking and limits; pss reads smaps_rollup (costly)"
    )
    listen: Listen = Field(DEFAULT_LISTEN, description="HOST:PORT the HTTP server binds")
    groups: Groups = Field(default_factory=Groups)
    gpu: Gpu = Field(default_factory=Gpu)
    enforcer: EnforcerConfig = Field(default_factory=EnforcerConfig)
    paths: Paths = Field(default_factory=Paths)
    web: Web = Field(default_factory=Web)
    zones: Zones = Field(default_factory=Zones)

    @model_validator(mode="after")
    def _conditions_have_what_they_need(self):
        for i, rule in enumerate(self.enforcer.rules):
            cond = conditions.of(rule)
            if (problem := cond.config_problem(self)) is not None:
                raise ValueError(f"enforcer.rules[{i}].{cond.field}: {problem}")
        return self

    @model_validator(mode="after")
    def _rules_say_what_they_watch(self):
        """Every group is a choice one writes, never what a forgotten or empty `match` means."""
        for i, rule in enumerate(self.enforcer.rules):
            if "match" not in rule.model_fields_set or (
                rule.match.is_empty and rule.match.group is None and not rule.match.every_group
            ):
                raise ValueError(
                    f"enforcer.rules[{i}].match: say which groups rule {rule.name!r} watches, e.g. "
                    "match: {cmdline: 'bun test'}, or match: {all: true} for every group"
                )
        return self


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "constrained-")):  # pydantic's names for validator wrappers
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _problem_text(err: ErrorDetails) -> str:
    kind = err.get("type")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = err.get("msg", "invalid")
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if "input" in err and kind not in ("value_error",) and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def _problem_line(source: str, err: ErrorDetails, lines: dict[tuple, int] | None = None) -> str:
    """`FILE: [line N: ]KEY: problem`; the line where the file has the key (or its nearest enclosing one)."""
    text = _problem_text(err)
    loc = tuple(p for p in err["loc"] if not str(p).startswith(("function-", "constrained-")))
    if not loc and (keyed := _KEYED_MESSAGE.match(text)):  # a cross-key check names its own key
        line = _line_of(_loc_of(keyed.group(0)[:-2]), lines)
        return f"{source}: {line}{text}"
    return f"{source}: {_line_of(loc, lines)}{_key_path(err['loc'])}: {text}"


def _loc_of(key_path: str) -> tuple:
    """("enforcer", "rules", 0, "max_pss") from `enforcer.rules[0].max_pss`."""
    return tuple(int(p) if p.isdigit() else p for p in re.findall(r"[a-z_]+|(?<=\[)\d+(?=\])", key_path))


def _line_of(loc: tuple, lines: dict[tuple, int] | None) -> str:
    for n in range(len(loc), 0, -1):
        if lines and (line := lines.get(loc[:n])) is not None:
            return f"line {line}: "
    return ""


_KEYED_MESSAGE = re.compile(r"^[a-z_]+(\.[a-z_]+|\[\d+\])*: ")


def validate_config(data: Any, source: str = "<config>", lines: dict[tuple, int] | None = None) -> Config:
    """The Config, or ConfigError: one line per problem, naming the file, the line where known, and the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: (top level): must be a mapping of keys, got {type(data).__name__}"])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_problem_line(source, err, lines) for err in e.errors()]) from None
    except Exception as e:  # whatever a validator raised (OverflowError, RecursionError): still one line
        raise ConfigError([f"{source}: {type(e).__name__}: {e}"]) from None


def _apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """Command-line values, keyed by dotted path (`paths.procfs`), win over the file."""
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return data


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """The validated config in `path` (the defaults when `path` is None), with `overrides` applied."""
    if path is None:
        return validate_config(_apply_overrides({}, overrides), "<defaults>")
    try:
        data, lines = read_yaml_lines(path)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    except RecursionError:  # aliases nested beyond Python's stack
        raise ConfigError([f"{path}: YAML nested too deeply"]) from None
    if isinstance(data, dict):
        data = _apply_overrides(data, overrides)
    return validate_config(data, str(path), lines)


def json_schema() -> dict:
    schema = Config.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mem-exporter configuration"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
