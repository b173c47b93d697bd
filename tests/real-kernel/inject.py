#!/usr/bin/env python3
"""Faults on request, for the emulated host's job: follows the console log LOG and,
for each line `GUEST-INJECT N COMMAND`, runs COMMAND on the emulated host's QEMU
through its QMP socket (as a monitor command: `pcie_aer_inject_error ...` or
`device_del ID`, nothing else), then writes QEMU's answer to OUTDIR/injected-N,
which the guest sees on its 9p share (guest-lib.sh's `inject`).

Usage: inject.py LOG QMP-SOCKET OUTDIR (runs until killed)."""

import json
import os
import socket
import sys
import time

ALLOWED = ("pcie_aer_inject_error ", "device_del ")


def monitor(path, command):
    """QEMU's answer to monitor `command`, or the error it gave."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        f = s.makefile("rw")
        f.readline()  # the greeting
        answer = {}
        for msg in (
            {"execute": "qmp_capabilities"},
            {"execute": "human-monitor-command", "arguments": {"command-line": command}},
        ):
            f.write(json.dumps(msg) + "\n")
            f.flush()
            while True:  # events may come first
                answer = json.loads(f.readline())
                if "return" in answer or "error" in answer:
                    break
        if "error" in answer:
            return "ERROR " + answer["error"].get("desc", "")
        return answer["return"].strip() or "OK"


def lines(path):
    """The lines of a file that is still being written, as they come."""
    while not os.path.exists(path):
        time.sleep(0.1)
    with open(path, errors="replace") as f:
        part = ""
        while True:
            chunk = f.readline()
            if not chunk:
                time.sleep(0.05)
                continue
            part += chunk
            if part.endswith("\n"):
                yield part.rstrip("\r\n")
                part = ""


def main():
    log, qmp, outdir = sys.argv[1:4]
    os.makedirs(outdir, exist_ok=True)
    for line in lines(log):
        words = line.split(" ", 2)
        if len(words) < 3 or words[0] != "GUEST-INJECT" or not words[1].isalnum():
            continue
        command = words[2]
        if command.startswith(ALLOWED):
            try:
                answer = monitor(qmp, command)
            except OSError as e:
                answer = f"ERROR no monitor: {e}"
        else:
            answer = "ERROR not an injection: " + command
        tmp = os.path.join(outdir, f".injected-{words[1]}")
        with open(tmp, "w") as f:
            f.write(answer + "\n")
        os.rename(tmp, os.path.join(outdir, f"injected-{words[1]}"))


if __name__ == "__main__":
    main()
