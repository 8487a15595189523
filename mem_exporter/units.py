"""Sizes, durations and ratios written the way people write them: `800MB`, `1.5GiB`, `2s`, `10%`."""

from __future__ import annotations

import math
import os
import re
import stat

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
MAX_SIZE = 2**63 - 1
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


_HERTZ_UNITS = {"": 1.0, "hz": 1.0, "khz": 1e3, "mhz": 1e6, "ghz": 1e9}


def _number_and_unit(value: int | float | str, what: str, examples: str) -> tuple[float, str]:
    """(number, lower-case unit) from `1.5GiB`; a bare number has unit ''."""
    if isinstance(value, bool):
        raise ValueError(f"a {what} must be a number or a string such as {examples.split(',')[0]!r}")
    if isinstance(value, (int, float)):
        return float(value), ""
    m = _NUMBER_UNIT.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a {what} (examples: {examples})")
    return float(m.group(1)), m.group(2).lower()


def parse_size(value: int | float | str, bare_unit: int = 1) -> int:
    """Bytes from `800MB`, `1.5GiB`, `1024`. A bare number counts in `bare_unit` bytes."""
    number, unit = _number_and_unit(value, "size", "800MB, 1.5GiB, 1048576")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r}: unknown size unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    factor = _SIZE_UNITS[unit] if unit else bare_unit
    if not math.isfinite(number):
        raise ValueError(f"{value!r}: a size must be a finite number of bytes")
    if number < 0:
        raise ValueError(f"{value!r}: a size cannot be negative")
    size = int(round(number * factor))
    if size > MAX_SIZE:
        raise ValueError(f"{value!r}: a size must be below 8 EiB (the kernel counts bytes in 63 bits)")
    return size


def parse_duration(value: int | float | str) -> float:
    """Seconds from `2s`, `500ms`, `1.5m`, `1h`, or a bare number of seconds."""
    number, unit = _number_and_unit(value, "duration", "2s, 500ms, 1m")
    if unit not in _DURATION_UNITS:
        raise ValueError(f"{value!r}: unknown duration unit {unit!r} (use ms, s, m, h)")
    seconds = number * _DURATION_UNITS[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r}: a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"{value!r}: a duration cannot be negative")
    return seconds


def parse_hertz(value: int | float | str) -> float:
    """Hertz from `1980MHz`, `1.98GHz` or a bare number of hertz."""
    number, unit = _number_and_unit(value, "frequency", "1980MHz, 1.98GHz")
    if unit not in _HERTZ_UNITS:
        raise ValueError(f"{value!r}: unknown frequency unit {unit!r} (use Hz, kHz, MHz, GHz)")
    return number * _HERTZ_UNITS[unit]


def parse_ratio(value: int | float | str) -> float:
    """A ratio 0..1 from `10%` or `0.1`."""
    if isinstance(value, bool):
        raise ValueError("a ratio must be a number such as 0.1 or a string such as '10%'")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            ratio = float(value.strip()[:-1]) / 100.0
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage") from None
    else:
        try:
            ratio = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a ratio (examples: 0.1, '10%')") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{value!r} is outside 0..1 (0%..100%)")
    return ratio


def _strict_loader():
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently,
    so a second `enforcer:` would replace the first). Keys brought in by a merge (`<<:`) may be overridden."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = self.construct_object(key_node)
                    try:
                        if key in first:
                            raise DuplicateKeyError(key, key_node.start_mark, first[key])
                        first[key] = key_node.start_mark.line
                    except TypeError:  # an unhashable key: the base class says so
                        continue
            return super().construct_mapping(node, deep)

    return StrictLoader


class DuplicateKeyError(Exception):
    def __init__(self, key, mark, first_line: int):
        where = f"line {mark.line + 1} column {mark.column + 1}"
        super().__init__(f"{where}: {key}: duplicate key (first given on line {first_line + 1})")


def read_yaml(path) -> object:
    """The parsed YAML in `path`, or ValueError with one line: `file: [line L column C: ]problem`."""
    return read_yaml_lines(path)[0]


def read_yaml_lines(path) -> tuple[object, dict[tuple, int]]:
    """(the parsed YAML in `path`, the 1-based line of each key by its path: ("enforcer", "rules", 0, "grace")),
    or ValueError with one line: `file: [line L column C: ]problem`. A key given twice in a mapping is an error."""
    import yaml

    source = str(path)
    raw = _read_config_bytes(path, source)
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not a text file (byte {e.start} is not UTF-8)") from None
    lines: dict[tuple, int] = {}
    loader = None
    try:
        loader = _strict_loader()(text)  # checks the characters at once
        node = loader.get_single_node()
        if node is not None:
            _key_lines(node, (), lines)  # before construction, which flattens merges into the nodes
        data = loader.construct_document(node) if node is not None else None
    except DuplicateKeyError as e:
        raise ValueError(f"{source}: {e}") from None
    except yaml.reader.ReaderError as e:
        raise ValueError(f"{source}: not a text file (character #x{e.character:04x} at {e.position})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{source}: {where}YAML syntax error: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


CONFIG_MAX_BYTES = 4 << 20  # far above any real config; /dev/zero or a runaway file must not fill memory
_OPEN_FLAGS = sum(getattr(os, name, 0) for name in ("O_NONBLOCK", "O_CLOEXEC", "O_BINARY"))  # each OS has some


def _read_config_bytes(path, source: str) -> bytes:
    """A config file's bytes. Only a regular file (a symlink to one, as a Kubernetes ConfigMap mounts it,
    is fine): a FIFO would block a check or a reload until someone writes, a device may never end."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError as e:
        raise ValueError(f"{source}: cannot read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{source}: cannot read: not a regular file ({_file_kind(mode)})")
        try:
            raw = f.read(CONFIG_MAX_BYTES + 1)
        except OSError as e:
            raise ValueError(f"{source}: cannot read: {e.strerror or e}") from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise ValueError(f"{source}: larger than {CONFIG_MAX_BYTES >> 20} MiB: not a config file")
    return raw


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a file"


def _key_lines(node, path: tuple, out: dict[tuple, int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                here = (*path, key_node.value)
                out.setdefault(here, key_node.start_mark.line + 1)
                _key_lines(value, here, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault((*path, i), item.start_mark.line + 1)
            _key_lines(item, (*path, i), out)


def iso_utc(ts: float) -> str:
    """ISO 8601 UTC with milliseconds, as every log and event of the project writes time."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
