"""`mem-exporter run`: start a command, watch its whole process tree, kill the tree at the limit.

The tree is every process whose ppid chain reaches the wrapper: the command and everything it
starts, in its process group or not (a `setsid` grandchild such as `ollama serve`). On Linux the
wrapper is a child subreaper, so a descendant orphaned on the way reparents to the wrapper instead
of init and stays in the tree. Members are remembered by (pid, start time): a reused pid is never
mistaken for one, and without a subreaper (macOS, Windows) an orphan seen before its parent exited
stays a member. The tree's summed memory is what the threshold limits: RSS, or with `--memory`
(by default on those OSes) macOS's footprint or Windows' private commit, the numbers Activity
Monitor and Task Manager show.

A Supervisor (supervisor.py) starts the command, forwards signals to the Runner and learns when the
command exits: the POSIX one with a self-pipe, waitpid and job control on a terminal, the polling
one (Windows) with Popen.poll() and short sleeps. The Runner (runner.py) keeps one loop on the main
thread: ask the supervisor for the command's exit, read the tree, hand the reading to its consumers
(the log, the status line, `--listen`, the limit check). Its Sampler is the one `serve` and `enforce`
use, over a reader scoped to the tree (tree.py), which reads it from the wrapper down through the
kernel's child links: at least every 0.5 s, and every 50 to 100 ms near the limit, as the
enforcer's fast lane does; once per interval that reading is a full sample (system memory too).
A young run (its first 5 s) is fully sampled every 0.25 s, so a 3 s test suite leaves a dozen
samples; whenever the peak was read, its reading goes into the log at the end (a `peak` line).
Nothing lists the host's processes, so the cost is the tree's, however busy the host. Where the
kernel has no child links, or the source is not procfs, the Sampler's full walk every interval and
a listing of new pids in between take their place. Stopping the tree goes through the
enforcer's kill engine (kill.execute): identity-checked signals to every member and killpg on the
command's group, grace with re-reads, the hard ceiling, SIGKILL, confirmed death. Nothing in the
tree is exempt: it is the user's own command.

    runner.py      the Runner: the loop, the consumers of each reading, stopping the tree, the report
    tree.py        the reader scoped to the tree (the Sampler's), through child links or full listings
    options.py     flags and environment variables
    supervisor.py  the Supervisor interface; the polling supervisor (Windows, and anywhere)
    posix.py       the POSIX supervisor (Linux, macOS): subreaper, self-pipe, terminal, Ctrl-Z
    supervisors.py which of the two this OS gets
    statusline.py  `-v` on a terminal: the status on the last row, the output scrolling above it
    adopt.py       which phase a run adopts (one of the present, not a stale one)
"""

from __future__ import annotations

from .options import RunOptions, SetupError, options_from
from .runner import Runner, main
from .tree import tree_members

__all__ = ["Runner", "RunOptions", "SetupError", "main", "options_from", "tree_members"]
