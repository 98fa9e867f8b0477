"""A process that imports torch and the comm package once, then forks gloo rank jobs on request.

    python -m tests.comm.zygote   # prints "ready"; then, per stdin line (a JSON list: rank_script's
                                  # arguments), forks a job leader and prints its PID

The leader runs `rank_script.fork_ranks` (which forks the ranks) with its output in
<outdir>/loglauncher, and leaves with os._exit. EOF on stdin ends the zygote.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import shardserve.comm.gloo  # noqa: F401 - imported once here, inherited by every fork
from tests.comm import rank_script


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def spawn(argv: list[str]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        args = rank_script.parse(argv)
        rank_script.log_to_file(args.outdir, "launcher")
        rank_script.fork_ranks(args)
        code = 0
    except BaseException:  # noqa: BLE001 - the leader must reach os._exit
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        reap()
        print(spawn(json.loads(line)), flush=True)
    reap()


if __name__ == "__main__":
    main()
