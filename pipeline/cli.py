"""``seedtune``: run a pipeline, show where a run stands, validate a config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import UserError
from pipeline.hashing import strip_credentials_in_text

EXIT_FAILED, EXIT_USER, EXIT_STOPPED, EXIT_REQUESTS_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seedtune", description=__doc__)
    p.add_argument("--version", action="version", version=f"seedtune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, config: bool = True) -> None:
        if config:
            sp.add_argument("config", help="pipeline YAML file")
            sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config key, e.g. --set stages.generate.target=20")
        sp.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        sp.add_argument("-v", "--verbose", action="store_true", help="show info logs on stderr")

    r = sub.add_parser("run", help="run (or continue) a pipeline")
    common(r)
    r.add_argument("--fresh", action="store_true", help="discard the run's state and start over")
    r.add_argument("--until", metavar="STAGE", help="stop after this stage")
    r.add_argument("--from", dest="from_stage", metavar="STAGE", help="recompute from this stage on")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--retry-failed", action="store_true",
                   help="send again the requests that failed permanently in earlier runs (transient ones always are)")

    s = sub.add_parser("status", help="one row per stage of a run")
    s.add_argument("run_dir", help="run directory (or the pipeline's config file)")
    s.add_argument("--json", action="store_true", help="print the manifest's stages as JSON")
    common(s, config=False)

    v = sub.add_parser("validate", help="check a config, its files, templates and models; print the plan")
    common(v)
    return p


# ---- formatting ---------------------------------------------------------------------------------------

def _fmt_int(n: Any) -> str:
    return "-" if n in (None, "") else f"{n:,}" if isinstance(n, int) else str(n)


def _elapsed(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}m"


def _rejected(stage: dict[str, Any]) -> str:
    rej = stage.get("rejected") or {}
    if not rej:
        return "0"
    top = sorted(rej.items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{k} {v}" for k, v in top[:4])
    more = f", +{len(top) - 4} rules" if len(top) > 4 else ""
    return f"{sum(rej.values())} ({parts}{more})"


def stage_table(stages: dict[str, dict[str, Any]]) -> str:
    header = ["stage", "state", "in", "out", "rejected (by rule)", "requests sent/cached", "tokens", "cost $",
              "failures", "elapsed"]
    rows = [header]
    for name, st in stages.items():
        tokens = (st.get("prompt_tokens") or 0) + (st.get("completion_tokens") or 0)
        req = (f"{_fmt_int(st.get('requests_sent', 0))}/{_fmt_int(st.get('requests_cached', 0))}"
               if st.get("requests_sent") or st.get("requests_cached") else "-")
        fails = st.get("open_failures") or st.get("failures") or 0
        rows.append([name, st.get("state", "pending"), _fmt_int(st.get("rows_in")), _fmt_int(st.get("rows_out")),
                     _rejected(st), req, _fmt_int(tokens) if tokens else "-",
                     f"{st['cost_usd']:.4f}" if st.get("cost_usd") else "-", _fmt_int(fails),
                     _elapsed(st.get("elapsed_s"))])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _details(run_dir: Path, stages: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, st in stages.items():
        m = st.get("metrics") or {}
        if st.get("kind") == "seeds" and "tasks" in m:
            out.append(f"{name}: {m['tasks']} tasks, {m.get('classification', 0)} classification, "
                       f"{m.get('with_input', 0)} with input")
        ev = m.get("evaluation")
        if isinstance(ev, dict) and ev.get("before") and ev.get("after"):
            b, a = ev["before"], ev["after"]
            keys = [k for k in ("validation_loss", "rouge_l", "stop_rate", "general_ppl", "ifeval_prompt_strict",
                                "ifeval_prompt_loose", "ifeval_instruction_strict", "ifeval_instruction_loose")
                    if k in b and k in a]
            change = ev.get("change") or {}

            def verdict(k: str) -> str:
                c = change.get(k)
                if not isinstance(c, dict):
                    return ""
                if not c.get("measurable"):
                    return f" (no measurable change, n={c.get('n')})"
                return f" (95% CI of the change {c['low']:+.3f}..{c['high']:+.3f}, n={c.get('n')})"

            out.append(f"{name}: " + ", ".join(f"{k} {b[k]:.3f} -> {a[k]:.3f}{verdict(k)}" for k in keys
                                               if isinstance(b[k], (int, float)) and isinstance(a[k], (int, float))))
            win = ev.get("win_rate")
            if isinstance(win, dict) and win.get("win_rate") is not None:
                ci = f"95% CI {win['low']:.3f}..{win['high']:.3f}, " if win.get("low") is not None else ""
                out.append(f"{name}: judged win rate of the tuned model {win['win_rate']:.3f} ({ci}n={win['n']}, "
                           f"judge {win['judge']}; {win['wins']} wins, {win['ties']} ties, {win['losses']} losses)")
        for f in st.get("failure_samples") or []:
            kind = "permanent" if f.get("permanent") else "transient"
            out.append(f"{name}: failed request ({f['kind']}, {kind}): {f['error']}")
        if st.get("error"):
            out.append(f"{name}: {st['error']}")
    for sub in ("export", "model"):
        if (run_dir / sub).exists():
            out.append(f"outputs: {run_dir / sub}")
    return out


# ---- commands -----------------------------------------------------------------------------------------

def _load(args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(args.config, args.set, args.table), args.table


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run.runner import Runner, RunOptions

    config, table = _load(args)
    err = sys.stderr

    def events(kind: str, data: dict[str, Any]) -> None:
        name = data["name"]
        if kind == "stage_start":
            print(f"> {name} ({data['kind']}) ...", file=err, flush=True)
        elif kind in ("stage_cached", "stage_restored"):
            rows = (data.get("info") or {}).get("stats", {}).get("rows_out")
            print(f"= {name}: {kind.split('_')[1]} ({_fmt_int(rows)} rows)"
                  + _drop_note((data.get("info") or {}).get("stats", {}).get("drop_warning")), file=err, flush=True)
        elif kind == "stage_end" and data.get("info"):
            st = data["info"]["stats"]
            print(f"+ {name}: {data['state']} in {_elapsed(data['info']['elapsed_s'])} "
                  f"({_fmt_int(st['rows_in'])} in, {_fmt_int(st['rows_out'])} out, {st['rejected_total']} rejected)"
                  + _drop_note(st.get("drop_warning")), file=err, flush=True)
        if kind in ("stage_cached", "stage_restored", "stage_end") and data.get("info"):
            for ex in (data["info"]["stats"].get("drop_warning") or {}).get("examples", []):
                print(f"    e.g. {ex['record']} -> {ex['reason']}", file=err, flush=True)

    runner = Runner(config, table, RunOptions(fresh=args.fresh, until=args.until, from_stage=args.from_stage,
                                              show_progress=not args.no_progress, retry_failed=args.retry_failed),
                    events)
    print(f"seedtune {__version__}: pipeline '{config.name}' -> {config.run_dir}", file=err)
    from pipeline.run.runner import AllRequestsFailed, RemovedEverything

    try:
        outcomes = runner.run()
    except AllRequestsFailed as e:
        _print_run(config.run_dir)
        print(f"error: {e}", file=err)
        return EXIT_REQUESTS_FAILED
    except RemovedEverything as e:
        _print_run(config.run_dir)
        print(f"error: {e}", file=err)
        return EXIT_USER
    _print_run(config.run_dir)
    return _failure_summary(outcomes, config.run_dir)


def _drop_note(warning: dict[str, Any] | None) -> str:
    if not warning:
        return ""
    return (f"; dropped {warning['dropped_share']:.0%}, most by {warning['top_rule']} "
            f"({_fmt_int(warning['top_rule_count'])})")


def _print_run(run_dir: Path) -> None:
    from pipeline.run.manifest import read_manifest

    manifest = read_manifest(run_dir)
    if manifest:
        print(stage_table(manifest["stages"]))
        for line in _details(run_dir, manifest["stages"]):
            print(line)


def _failure_summary(outcomes: list, run_dir: Path) -> int:
    """Exit 0 when no request failed in this run; else one line and exit 4."""
    ran = [o for o in outcomes if o.state not in ("cached", "restored")]
    failed = sum(o.stats.get("failures", 0) for o in ran)
    earlier = sum(o.stats.get("failures_permanent", 0) for o in outcomes if o.state in ("cached", "restored"))
    if earlier:
        print(f"note: {earlier} requests failed permanently in earlier runs and are left out "
              f"(`seedtune status {run_dir}`; --retry-failed sends them again)", file=sys.stderr)
    if not failed:
        return 0
    permanent = sum(o.stats.get("failures_permanent", 0) for o in ran)
    kinds: dict[str, int] = {}
    for o in ran:
        for k, v in (o.stats.get("failure_kinds") or {}).items():
            kinds[k] = kinds.get(k, 0) + v
    parts = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    retry = []
    if failed - permanent:
        retry.append(f"{failed - permanent} transient: a re-run retries them")
    if permanent:
        retry.append(f"{permanent} permanent: re-sent only with --retry-failed")
    print(f"completed with {failed} failed requests ({parts}); {'; '.join(retry)}. "
          f"`seedtune status {run_dir}` lists them", file=sys.stderr)
    return EXIT_REQUESTS_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.run.manifest import read_manifest

    path = Path(args.run_dir)
    if path.is_file():
        from pipeline.config import load_config

        path = load_config(path).run_dir
    manifest = read_manifest(path)
    if manifest is None:
        raise UserError(f"{path}: no manifest.json here (not a seedtune run directory, or it never started)")
    if args.json:
        print(json.dumps(manifest["stages"], indent=2))
        return 0
    print(f"run '{manifest.get('name')}' in {path} (config {manifest.get('config_path')}, "
          f"hash {manifest.get('config_hash')}, updated {manifest.get('updated')})")
    print(stage_table(manifest["stages"]))
    for line in _details(path, manifest["stages"]):
        print(line)
    for line in _batches(path):
        print(line)
    return 0


def _batches(run_dir: Path) -> list[str]:
    """Batches submitted to a Batch API and not yet collected, from the journal's state (read only)."""
    import sqlite3

    from pipeline.models.openai_batch import batches_in_flight

    db = run_dir / "journal.sqlite"
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT namespace, key, value FROM state WHERE namespace LIKE 'model:%' "
                               "ORDER BY namespace, key").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []
    out = []
    for ns in sorted({r[0] for r in rows}):
        for line in batches_in_flight([(k, v) for n, k, v in rows if n == ns]):
            out.append(f"batch in flight ({ns[len('model:'):]}): {line}")
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.models.base import BackendUnavailable
    from pipeline.run.runner import Runner
    from pipeline.stages import stage_module

    config, table = _load(args)
    print(f"config {config.path}: OK ({len(config.stages)} stages, {len(config.models)} models)")
    problems = []
    for spec in config.stages:
        module = stage_module(spec.kind, table)
        if hasattr(module, "check"):
            try:
                module.check(spec.options)
                print(f"  stage {spec.name} ({spec.kind}): files and templates OK")
            except UserError as e:
                problems.append(f"stage {spec.name}: {e}")
    runner = Runner(config, table)
    for name in config.models:
        backend = None
        try:
            backend = runner.build_backend(name)
            backend.check()
            print(f"  model {name} ({config.models[name].backend}): reachable")
        except BackendUnavailable as e:
            problems.append(f"model {name}: {e}")
        finally:
            if backend is not None:
                backend.close()
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return EXIT_USER
    print("plan:")
    for row in runner.plan():
        print(f"  {row['name']:<16} {row['kind']:<14} {row['action']}")
    from pipeline.run.estimate import estimate_lines

    print("estimate (worst case):")
    for line in estimate_lines(config, table):
        print(line)
    return 0


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    logging.getLogger("pipeline").addHandler(handler)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # seedtune shows its own progress bars; the libraries' per-file bars would bury them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None, table: dict[str, str] | None = None) -> int:
    """Entry point. ``table`` maps stage kinds to modules (default: :data:`pipeline.stages.STAGES`)."""
    from pipeline.stages import STAGES

    args = _parser().parse_args(argv)
    args.table = table or STAGES
    _setup_logging(args)
    # Ctrl-C and a plain kill end the run cleanly, also where SIGINT was inherited as ignored
    # (a job started in the background of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    handlers = {"run": cmd_run, "status": cmd_status, "validate": cmd_validate}
    if args.command == "run" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch
        return _run_ranks(args, handlers)
    return _dispatch(args, handlers)


def _run_ranks(args: argparse.Namespace, handlers: dict[str, Any]) -> int:
    from pipeline.run.distributed import RankFailed, run_ranks

    try:
        return run_ranks(args.table, lambda: _dispatch(args, handlers))
    except RankFailed as e:
        print(f"error: {strip_credentials_in_text(str(e))}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The other ranks wait in collectives of the failed stage: this process ending now is what ends their
        # wait, where an orderly exit would tear the process group down under them (or hang in it).
        os._exit(e.code)
    except UserError as e:
        print(f"error: {strip_credentials_in_text(str(e))}", file=sys.stderr)
        return EXIT_USER


def _dispatch(args: argparse.Namespace, handlers: dict[str, Any]) -> int:
    from pipeline.run.distributed import RankFailed
    from pipeline.run.runner import Interrupted, StageStopped

    try:
        return handlers[args.command](args)
    except RankFailed:
        raise  # every rank ends at once (see _run_ranks)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {strip_credentials_in_text(str(e))}", file=sys.stderr)
        return EXIT_USER
    except Interrupted as e:
        print(f"\ninterrupted in stage '{e.stage}'. Every answer received so far is kept: run the same command "
              f"again to continue where it stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted. Run the same command again to continue where it stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StageStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {strip_credentials_in_text(str(e))} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
