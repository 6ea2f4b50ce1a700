"""Serve the sandbox until interrupted: `python -m antavo_ometria_tools.sandbox --customers 500`."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from antavo_ometria_tools.sandbox import Sandbox


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=1000, help="size of the synthetic population")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--antavo-port", type=int, default=8701)
    parser.add_argument("--ometria-port", type=int, default=8702)
    parser.add_argument("--ometria-rate", type=float, default=0.0, help="push requests/s before 429 (0: none)")
    parser.add_argument("--antavo-latency", type=float, default=0.0,
                        help="seconds each Antavo request takes before it is answered (0.15 is realistic)")
    parser.add_argument("--state-file", type=Path, help="keep both accounts here between starts (make run does)")
    args = parser.parse_args()
    with Sandbox(args.customers, args.seed, args.ometria_rate, args.antavo_port, args.ometria_port,
                 args.state_file, args.antavo_latency) as sandbox:
        print(f"Antavo sandbox:  {sandbox.antavo_url}  ({args.customers} customers)")
        print(f"Ometria sandbox: {sandbox.ometria_url}  (inspect {sandbox.ometria_url}/_sandbox/contacts)")
        print("Connections for Airflow:")
        for name, value in sandbox.connections().items():
            print(f"  export {name}='{value}'")
        stop = threading.Event()
        for stop_signal in (signal.SIGTERM, signal.SIGHUP):  # closing the terminal saves the accounts too
            signal.signal(stop_signal, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
