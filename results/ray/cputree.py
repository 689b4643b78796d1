"""CPU seconds (user + system) of a process and all its descendants, Ray's workers and daemons
included, which /usr/bin/time misses (they are not waited for by the driver). Polls /proc every
0.5 s and keeps each process's last reading, so a process that exits loses at most its last 0.5 s.

    python cputree.py PID   # prints 'cpu_tree_s=<seconds> processes=<count>' when PID exits
"""

import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK  # ppid, utime + stime


def main(root):
    seen = {}
    while os.path.exists(f"/proc/{root}"):
        parents, cpu = {}, {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    parents[int(name)], cpu[int(name)] = stat(name)
                except (OSError, ValueError, IndexError):
                    continue
        tree, grew = {root}, True
        while grew:
            new = {pid for pid, parent in parents.items() if parent in tree and pid not in tree}
            tree |= new
            grew = bool(new)
        for pid in tree & cpu.keys():
            seen[pid] = max(seen.get(pid, 0.0), cpu[pid])
        time.sleep(0.5)
    print(f"cpu_tree_s={sum(seen.values()):.1f} processes={len(seen)}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
