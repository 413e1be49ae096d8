#!/usr/bin/env python3
"""iowrap.py OUT CMD [ARGS...]: run CMD with stdin/stdout passed through (it can be the
remote end of an ssh session), then write to OUT the bytes it and its waited-for children
caused to be written to storage (rusage ru_oublock x 512, the same accounting as
/proc/PID/io write_bytes)."""
import os
import resource
import subprocess
import sys

out, cmd = sys.argv[1], sys.argv[2:]
rc = subprocess.call(cmd)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    f.write(f"{ru.ru_oublock * 512}\n")
sys.exit(rc)
