"""`mem-exporter run ARGS` with the polling supervisor forced: what Windows runs, run for real on this OS.

python tests/polling_run.py [run's options] [--] CMD [ARGS...]
"""

from __future__ import annotations

import sys

from mem_exporter.cli import build_parser
from mem_exporter.run import main
from mem_exporter.run.supervisor import PollingSupervisor

if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args(["run", *sys.argv[1:]]), supervisor=PollingSupervisor()))
