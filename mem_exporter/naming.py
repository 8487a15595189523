"""What to call a command: the program a shell or a launcher runs, not the shell.

`bash -c "bun test"`, `sh -c 'exec bun test'` and `env FOO=1 bun test` are all `bun`: the group `run` watches,
and a group in `top` whose leader is such a wrapper, is named after the program that does the work. A
shell running a script (`bash ci.sh`) is named after the script. Of a list (`cd app && bun test`,
`setup; bun test | tee out`) the last command that is not a shell builtin counts, of a pipeline its
first program; a script of builtins alone (`exit 3`) is named after the shell.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox"})
# builtins and waiting: never what a list is named after (`A & B & wait` is B, `exit 3` is the shell)
BUILTINS = frozenset(
    {
        "exit",
        "return",
        "wait",
        "cd",
        "export",
        "set",
        "unset",
        "true",
        "false",
        ":",
        "echo",
        "printf",
        "kill",
        "trap",
        "shift",
        "read",
        "eval",
        "source",
        ".",
        "test",
        "[",
        "ulimit",
        "umask",
        "sleep",
    }
)
LAUNCHERS = frozenset({"env", "exec", "nice", "nohup", "time", "timeout", "stdbuf", "setsid", "ionice", "chrt"})
_LIST = frozenset({";", "&&", "||", "&", ";;", "\n"})  # what separates the commands of a list
MAX_DEPTH = 4  # wrappers unwrapped at most (bash -c "env sh -c '...'")


def program_name(argv: Sequence[str]) -> str:
    """The base name of the program `argv` ends up running, as far as its words tell."""
    words = list(argv)
    for _ in range(MAX_DEPTH):
        if not words:
            break
        head = os.path.basename(words[0])
        rest = words[1:]
        if head in SHELLS:
            if "-c" in rest[:3] and rest.index("-c") + 1 < len(rest):
                words = _last_command(rest[rest.index("-c") + 1])
                if not words:
                    return head
                continue
            script = next((w for w in rest if not w.startswith("-")), None)
            return os.path.basename(script) if script else head
        if head in LAUNCHERS:
            words = _after_options(rest)
            continue
        return head or "run"
    return os.path.basename(argv[0]) if argv else "run"


def _last_command(script: str) -> list[str]:
    """The words of the last command of a shell list, the first program of its pipeline; [] when the script
    cannot be split (unbalanced quotes: the shell's own problem)."""
    lexer = shlex.shlex(script.replace("\n", " ; "), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    try:
        for token in lexer:
            if token in _LIST:
                commands.append([])
            elif token == "|":
                commands.append(["|"])  # a later part of a pipeline: never the one named
            else:
                commands[-1].append(token)
    except ValueError:
        return []
    named = [words for words in commands if words and words[0] != "|" and words[0] not in BUILTINS]
    return named[-1] if named else []


def _after_options(words: list[str]) -> list[str]:
    """The command a launcher runs: past its options, VAR=value pairs and (timeout, nice) numbers."""
    i = 0
    while i < len(words) and (
        words[i].startswith("-") or "=" in words[i] or words[i].replace(".", "", 1).rstrip("smhd").isdigit()
    ):
        i += 1
    return words[i:]
