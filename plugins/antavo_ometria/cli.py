"""Command line: `python -m antavo_ometria.cli COMMAND` (the Makefile wraps the common ones).

    run        run the contact sync DAG once with `airflow dags test`, against the local sandbox
               unless AIRFLOW_CONN_ANTAVO_DEFAULT and AIRFLOW_CONN_OMETRIA_DEFAULT are set
    validate   check the mapping table, settings and trigger rules; list every problem with file, line, column
    fields     list the loyalty fields that can be mapped
    preview    show sample customers next to the Ometria records they become
    diff       show which payload fields change between the committed mapping and an edited one
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from antavo_ometria.mapping import catalog, load_contact_mapping
from antavo_ometria.problems import ConfigError
from antavo_ometria.settings import mappings_dir

PROJECT = Path(__file__).resolve().parents[2]
DAG_ID = "antavo_ometria_contacts"
SHOWN = re.compile(r"\[antavo_ometria|\[DAG TEST\] (starting|end)|DagRun Finished|\[error|ERROR|Traceback")


def airflow_env() -> dict[str, str]:
    """Airflow's embedded default (SQLite, LocalExecutor) in the project's own folder."""
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(PROJECT / ".airflow"))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(PROJECT / "dags"))
    env.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(PROJECT / "plugins"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    return env


def _airflow(args: list[str], env: dict[str, str], log_file: Path) -> int:
    """Run an airflow command; show progress lines, keep the full output in `log_file`."""
    command = [str(Path(sys.executable).with_name("airflow")), *args]
    with log_file.open("a", encoding="utf-8") as log, subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            log.write(line)
            if SHOWN.search(line):
                print("  " + line.rstrip()[:220], flush=True)
    return process.returncode


def cmd_run(args: argparse.Namespace) -> int:
    env = airflow_env()
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    log_file = home / "last_run.log"
    log_file.write_text("")
    sandbox = None
    if not (env.get("AIRFLOW_CONN_ANTAVO_DEFAULT") and env.get("AIRFLOW_CONN_OMETRIA_DEFAULT")):
        from antavo_ometria.sandbox import Sandbox

        sandbox = Sandbox(customers=args.customers).start()
        env.update(sandbox.connections())
        # a new sandbox holds a new population: start from an empty state store too
        env["ANTAVO_OMETRIA_STATE_URL"] = f"sqlite:///{home / 'sandbox_state.db'}"
        (home / "sandbox_state.db").unlink(missing_ok=True)
        print(f"No real credentials set: using the local sandbox ({args.customers} customers)\n"
              f"  Antavo  {sandbox.antavo_url}\n  Ometria {sandbox.ometria_url}")
    try:
        print("Preparing Airflow's database (SQLite) …", flush=True)
        if _airflow(["db", "migrate"], env, log_file):
            print(f"airflow db migrate failed; see {log_file}")
            return 1
        started = time.time()
        print(f"Running {DAG_ID} with `airflow dags test` …", flush=True)
        code = _airflow(["dags", "test", DAG_ID], env, log_file)
        reports = sorted((Path(env.get("ANTAVO_OMETRIA_STAGING_DIR") or home / "staging") / DAG_ID).glob("*/report.json"),
                         key=lambda p: p.stat().st_mtime)
        if reports and reports[-1].stat().st_mtime >= started:
            from antavo_ometria.pipeline import format_report

            print("\n" + format_report(json.loads(reports[-1].read_text())))
        if sandbox is not None:
            print(f"\nThe Ometria sandbox now holds {len(sandbox.ometria.contacts)} contacts.")
        print(f"Full Airflow log: {log_file}")
        if code:
            print(f"The run failed (exit code {code}); the end of the log:")
            print("".join(log_file.read_text().splitlines(keepends=True)[-40:]))
        return code
    finally:
        if sandbox is not None:
            sandbox.stop()


def cmd_validate(args: argparse.Namespace) -> int:
    from antavo_ometria.event_rules import load_rules

    directory = Path(args.mappings)
    problems = []
    try:
        mapping = load_contact_mapping(directory, Path(args.file) if args.file else None)
    except ConfigError as exc:
        problems += exc.problems
    try:
        rules = load_rules(directory)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        print(ConfigError(problems), file=sys.stderr)
        return 1
    print(f"OK: {len(mapping.fields)} mappings, {mapping.settings.payload_mode} mode, version {mapping.version}; "
          f"{len(rules)} event trigger rule(s)")
    return 0


def cmd_fields(args: argparse.Namespace) -> int:
    print(f"{'loyalty field':40} {'format':9} {'modes':10} module")
    for field in catalog():
        print(f"{field.path:40} {field.format:9} {' '.join(field.modes):10} {field.module}")
    print("\n* stands for a tier-structure ID, account ID, external ID field or custom property name.")
    return 0


def _mapping_from(path: Path):
    """A mapping folder, or a contacts CSV read with the settings beside it (else the project's)."""
    if path.is_dir():
        return load_contact_mapping(path)
    settings_dir = path.parent if (path.parent / "settings.toml").exists() else mappings_dir()
    return load_contact_mapping(settings_dir, path)


def _committed_mappings(directory: Path) -> Path | None:
    """The mapping folder as committed in git (HEAD), copied to a temporary folder."""
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="mappings-head-"))
    for name in ("contacts.csv", "settings.toml"):
        shown = subprocess.run(["git", "show", f"HEAD:./{name}"], cwd=directory, capture_output=True)
        if shown.returncode:
            return None
        (target / name).write_bytes(shown.stdout)
    return target


def cmd_preview(args: argparse.Namespace) -> int:
    from antavo_ometria.preview import load_customers, render_preview

    try:
        mapping = _mapping_from(Path(args.mapping))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    customers = load_customers(Path(args.customers) if args.customers else None, args.count)
    print(render_preview(customers, mapping))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from antavo_ometria.preview import load_customers, render_diff

    before_path = Path(args.before) if args.before else _committed_mappings(Path(args.after))
    if before_path is None:
        print("no committed mapping to compare with; pass --before", file=sys.stderr)
        return 1
    try:
        before, after = _mapping_from(before_path), _mapping_from(Path(args.after))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    customers = load_customers(Path(args.customers) if args.customers else None, args.count)
    print(render_diff(customers, before, after))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="antavo-ometria", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the contact sync once")
    run.add_argument("--customers", type=int, default=1000, help="sandbox population size")
    run.set_defaults(func=cmd_run)
    validate = commands.add_parser("validate", help="check the mapping files")
    validate.add_argument("--mappings", default=str(mappings_dir()))
    validate.add_argument("--file", help="a contacts mapping CSV other than <mappings>/contacts.csv")
    validate.set_defaults(func=cmd_validate)
    commands.add_parser("fields", help="list mappable loyalty fields").set_defaults(func=cmd_fields)
    preview = commands.add_parser("preview", help="sample customers next to their Ometria records")
    preview.add_argument("-n", "--count", type=int, default=3)
    preview.add_argument("--mapping", default=str(mappings_dir()), help="a mapping folder or contacts CSV")
    preview.add_argument("--customers", help="a JSON or NDJSON file of Antavo customers (default: sandbox)")
    preview.set_defaults(func=cmd_preview)
    diff = commands.add_parser("diff", help="what changes between two mappings")
    diff.add_argument("--before", help="mapping folder or CSV (default: the committed mapping)")
    diff.add_argument("--after", default=str(mappings_dir()), help="mapping folder or CSV (default: the working copy)")
    diff.add_argument("-n", "--count", type=int, default=200, help="sample customers")
    diff.add_argument("--customers", help="a JSON or NDJSON file of Antavo customers (default: sandbox)")
    diff.set_defaults(func=cmd_diff)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
