"""Memory used by an agent, read from the process table (blocking: run in a thread).

Both providers report the agent's main pid on this machine; an agent may
fork, so the resident memory of its whole process tree is counted.
"""
import psutil


def resident_memory(pid: int) -> int:
    """Bytes of resident memory of ``pid`` and its descendants (0 if gone)."""
    if pid <= 0:
        return 0
    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total
