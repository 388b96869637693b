"""Command line: run the daemon, check a profile, and talk to a running daemon (status, reload, restart).

Exit codes: 0 ok; 1 the daemon answered but is not ready / the action failed / `run` could not listen (a
condition that may pass: systemd retries it); 2 invalid input (bad profile or settings: an edit is needed, so
the unit's RestartPreventExitStatus=2 stops retrying); 3 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_NOT_READY, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-supervisor", description="Keeps llama.cpp's llama-server alive and useful.")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the supervisor in the foreground (what systemd starts)")
    run.add_argument("--profile", help="profile YAML file (or a name in profiles_dir)")
    run.add_argument("--config", help="settings file (default /etc/llama-supervisor/supervisor.yaml)")
    run.add_argument("--host", help="listen address (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="listen port (default 8080; 0 picks a free one)")
    run.add_argument("--state-dir", help="where learned settings are kept")
    run.add_argument("--log-format", choices=["auto", "json", "console"])
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = sub.add_parser("check", help="validate a profile and print the exact llama-server command line")
    check.add_argument("profile", help="profile YAML file")
    check.add_argument("--json", action="store_true", help="print argv as a JSON list")

    for name, text in (("status", "summary of a running supervisor"), ("reload", "reload the active profile"),
                       ("restart", "restart llama-server"),
                       ("upgrade", "try another llama-server build (canary) and switch to it when it is as good")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--url", help="supervisor URL (default from settings: http://127.0.0.1:8080)")
        c.add_argument("--admin-key", help="admin key (default: LLAMA_SUPERVISOR_ADMIN_KEY / settings)")
        if name in ("status", "upgrade"):
            c.add_argument("--json", action="store_true", help="print the raw JSON answer")
        if name == "restart":
            c.add_argument("--reset", action="store_true", help="forget ladder adjustments; use the profile's values")
        if name == "upgrade":
            c.add_argument("--binary", required=True, help="the new llama-server (a path on the supervisor's machine)")
            c.add_argument("--model", help="the model to upgrade (several models; default: the default model)")
            c.add_argument("--dry-run", action="store_true", help="run the canary and print it; never switch")
    act = sub.add_parser("activity", help="the latest proxied requests, newest first (the activity log)")
    act.add_argument("--model", help="only this model's requests")
    act.add_argument("--slow", type=float, metavar="MS", help="only requests that took at least this many ms")
    act.add_argument("--status", help="a status class (2xx, 4xx, 5xx, error) or one code")
    act.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    act.add_argument("--json", action="store_true", help="print the raw /activity JSON")
    rep = sub.add_parser("replay", help="send a captured request again (capture: errors|all) and compare")
    rep.add_argument("id", type=int, help="the record's id (from `activity`)")
    rep.add_argument("--model", help="send it to this model instead of the one it went to")
    for c in (act, rep):
        c.add_argument("--url", help="supervisor URL (default from settings: http://127.0.0.1:8080)")
        c.add_argument("--admin-key", help="admin key (default: LLAMA_SUPERVISOR_ADMIN_KEY / settings)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.cmd == "run":
        sys.exit(_run(args))
    if args.cmd == "check":
        sys.exit(_check(args))
    sys.exit(_remote(args))


def _run(args: argparse.Namespace) -> int:
    # The daemon runs on asyncio alone, but httpcore imports trio whenever it is installed (selenium, a test
    # dependency, puts it in development environments): about 0.1 s and 4 MB of every start for a library
    # it never uses. A None entry makes that import fail the way it does where trio is absent (httpcore then
    # uses anyio, as it does in production). Only here, in the daemon's own process: tests keep trio.
    sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
    from .daemon import serve
    from .spec.profile import ProfileError
    from .spec.settings import ConfigError, load_config
    from .telemetry import logs

    if args.config:
        os.environ["LLAMA_SUPERVISOR_CONFIG"] = args.config
    overrides = {"host": args.host, "port": args.port, "profile": args.profile, "state_dir": args.state_dir,
                 "log_format": args.log_format, "log_level": args.log_level}
    try:
        cfg = load_config(**overrides)
        profile_path = cfg.resolved_profile()
    except ConfigError as exc:
        print(f"llama-supervisor: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    logs.setup(cfg.log_format, cfg.log_level)
    settings_file = Path(os.environ["LLAMA_SUPERVISOR_CONFIG"]) if os.environ.get("LLAMA_SUPERVISOR_CONFIG") else None
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(serve(cfg, profile_path, settings_file, overrides))
    except ProfileError as exc:
        print(f"llama-supervisor: invalid profile:\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        # The address may be taken by a process on its way out, or not configured yet at boot: worth a retry.
        print(f"llama-supervisor: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_NOT_READY


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _check(args: argparse.Namespace) -> int:
    from .core.command import build_argv
    from .spec.loaded import base_settings, load_checked
    from .spec.profile import ProfileError

    try:
        loaded = load_checked(Path(args.profile))
    except ProfileError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID
    p = loaded.profile
    argv = build_argv(p, loaded.caps, base_settings(p), p.port or 0)
    if p.port is None:
        argv[argv.index("--port") + 1] = "<free port>"
    if args.json:
        print(json.dumps(argv))
    else:
        print(f"# profile {p.name} ({args.profile}), llama-server {loaded.caps.version}", file=sys.stderr)
        print(shlex.join(argv))
        print(f"# {_estimate_line(p)}", file=sys.stderr)
    return EXIT_OK


def _estimate_line(p: Any) -> str:
    """What the VRAM estimate would decide for this profile on this machine."""
    from .core import estimate
    from .host import gpu
    from .host.gguf import footprint

    gpus = gpu.snapshot()
    if not gpus:
        return f"VRAM estimate: no GPU information ({gpu.unavailable_reason()})"
    fp = footprint(p.model, p.ctx_size, p.cache_type_k, p.cache_type_v, p.mmproj)
    est = estimate.fit_layers(fp, gpus[0].memory_free_mib)
    asked = estimate.requested_offload(p.n_gpu_layers, fp.n_layers)
    verdict = ("llama.cpp fits 'auto' itself" if asked is None else
               "fits as asked" if est.layers >= asked else f"asks for {asked}: would start with {est.layers}")
    return f"VRAM estimate on GPU 0 ({gpus[0].name}, {gpus[0].memory_free_mib:.0f} MiB free): {est.describe()}; {verdict}"


def _remote(args: argparse.Namespace) -> int:
    import httpx

    from .spec.settings import ConfigError, load_config

    try:
        cfg = load_config()
    except ConfigError as exc:
        print(f"llama-supervisor: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = (args.url or f"http://{host}:{cfg.port}").rstrip("/")
    secret = cfg.admin_key or cfg.api_key  # the admin routes take the API key when there is no admin key
    key = args.admin_key or (secret.get_secret_value() if secret else None)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            if args.cmd == "upgrade":  # the canary starts a llama-server and waits for it: as long as a start
                body = {"binary": os.path.abspath(args.binary), "model": args.model, "dry_run": args.dry_run}
                r = client.post("/admin/upgrade", json=body, timeout=cfg.load_max_s + 4 * cfg.warmup_timeout_s)
            elif args.cmd == "status":
                r = client.get("/status")
            elif args.cmd == "activity":
                query = {"model": args.model, "min_duration_ms": args.slow, "status": args.status, "limit": args.limit}
                r = client.get("/activity", params={k: v for k, v in query.items() if v is not None})
            elif args.cmd == "replay":
                r = client.post(f"/admin/activity/{args.id}/replay", params={"model": args.model} if args.model else {})
                if r.status_code < 400:
                    new = r.json()["id"]
                    docs = [client.get(f"/activity/{i}").json() for i in (args.id, new)]
                    print(format_replay(docs[0], docs[1]))
                    return EXIT_OK
            elif args.cmd == "reload":
                r = client.post("/admin/reload")
            else:
                r = client.post("/admin/restart", params={"reset": "1" if args.reset else "0"})
    except httpx.HTTPError as exc:
        print(f"llama-supervisor: cannot reach {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        data = r.json()
    except ValueError:
        data = {"error": r.text}
    if args.cmd == "upgrade" and "verdict" in data:
        print(json.dumps(data, indent=2) if args.json else format_upgrade(data))
        return EXIT_OK if data.get("passed") else EXIT_NOT_READY
    if r.status_code >= 400 and args.cmd != "reload":
        print(f"llama-supervisor: {url} answered {r.status_code}: {json.dumps(data)}", file=sys.stderr)
        return EXIT_NOT_READY if r.status_code != 401 else EXIT_INVALID
    if args.cmd == "status":
        print(json.dumps(data, indent=2) if args.json else format_status(data))
        return EXIT_OK if data.get("state") == "ready" else EXIT_NOT_READY
    if args.cmd == "activity":
        print(json.dumps(data, indent=2) if args.json else format_activity(data.get("requests") or []))
        return EXIT_OK
    print(json.dumps(data))
    return EXIT_OK if r.status_code < 400 else EXIT_NOT_READY


def format_upgrade(d: dict[str, Any]) -> str:
    """The canary's comparison, old build against new, one check a line; then what happened."""
    rows = (d.get("verdict") or {}).get("rows") or []
    w = max([len(r["check"]) for r in rows] + [5])
    lines = [f"{'check':<{w}}  {'old':>18}  {'new':>18}  ok"]
    for r in rows:
        mark = "yes" if r["ok"] else "NO: " + r["reason"]
        lines.append(f"{r['check']:<{w}}  {str(r['old'])[:18]:>18}  {str(r['new'])[:18]:>18}  {mark}")
    where = f" (candidate run {d['where']})" if d.get("where") and d["where"] != "nowhere" else ""
    if d.get("passed"):
        outcome = ("passed; dry run: not switched" if d.get("dry_run") else
                   "passed; switched (on probation for upgrade_probation_s)" if d.get("switched") else
                   f"passed; {d.get('note') or 'not switched'}")
    else:
        outcome = "FAILED; the running build stays" + ("" if d.get("dry_run") else " and this build is not tried again")
        outcome += "".join(f"\n  {why}" for why in d.get("reasons") or [] if not rows)
    return "\n".join([*lines, outcome + where])


def format_status(d: dict[str, Any]) -> str:
    """A summary for people; `--json` gives everything."""
    lines = [f"state:     {d['state']}" + (f" ({d['reason']})" if d.get("reason") else "")
             + (f" since {d['since']}" if d.get("since") else "")]
    prof = d.get("profile") or {}
    lines.append(f"profile:   {prof.get('name')} ({prof.get('file')})")
    child = d.get("child")
    if child:
        rss = child.get("rss_bytes")
        lines.append(f"child:     pid {child['pid']}, up {child['uptime_s']:.0f}s"
                     + (f", {rss / 2**20:.0f} MiB RSS" if rss else ""))
    else:
        lines.append("child:     not running")
    sup = d.get("supervisor") or {}
    lines.append(f"uptime:    {sup.get('uptime_s', 0):.0f}s, restarts: {d.get('restarts', 0)}")
    last = d.get("last_exit")
    if last:
        how = f"signal {last['signal']}" if last.get("signal") else f"code {last.get('code')}"
        lines.append(f"last exit: {last['cause']} ({how}) at {last['at']}: {last['detail']}")
    s = d.get("settings") or {}
    prof_s, eff = s.get("profile") or {}, s.get("effective") or {}
    for key in ("n_gpu_layers", "ctx_size", "mmproj_offload", "cpu_only"):
        mark = "" if prof_s.get(key) == eff.get(key) else "   <- adjusted"
        lines.append(f"{key + ':':<16}profile {prof_s.get(key)!s:<8} effective {eff.get(key)!s}{mark}")
    if s.get("adjustment"):
        lines.append(f"adjustment: {s['adjustment']}")
    if d.get("load_s") is not None:
        lines.append(f"load: {d['load_s']:.2f}s, warmup: {d.get('warmup_s')}s")
    if d.get("last_reload_error"):
        errs = d["last_reload_error"]
        lines.append("last reload error: " + "; ".join(f"{errs['file']}: {e['field']}: {e['message']}"
                                                        for e in errs["errors"]))
    return "\n".join(lines)


def _n(v: Any, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


ACTIVITY_COLUMNS = (("id", "id", 0), ("UTC", "at", 0), ("model", "model", 0), ("route", "route", 0),
                    ("status", "status", 0), ("ms", "duration_ms", 0), ("ttft", "ttft_ms", 0),
                    ("queue", "queue_ms", 0), ("load", "load_ms", 0), ("in", "prompt_tokens", 0),
                    ("out", "completion_tokens", 0), ("tok/s", "decode_tps", 1))


def format_activity(rows: list[dict[str, Any]]) -> str:
    """The records as a table, newest first; what the supervisor did (or the error) at the end of the line."""
    if not rows:
        return "no requests recorded (yet)"
    table = [[h for h, _, _ in ACTIVITY_COLUMNS] + ["notes"]]
    for r in rows:
        cells = [(r["at"][11:19] if k == "at" else _n(r.get(k), d)) for _, k, d in ACTIVITY_COLUMNS]
        notes = (["stream"] if r.get("stream") else []) + list(r.get("notes") or [])
        if r.get("replay_of"):
            notes.insert(0, f"replay of {r['replay_of']}")
        if r.get("error"):
            notes.insert(0, str(r["error"])[:80])
        table.append(cells + ["; ".join(notes)])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in table).rstrip()


def format_replay(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The two records side by side: the replay's id first, then what changed."""
    lines = [f"replayed {old['id']} as {new['id']} (model {new['model']})"]
    for label, key, digits in (("status", "status", 0), ("ttft ms", "ttft_ms", 1), ("duration ms", "duration_ms", 1),
                               ("prompt tokens", "prompt_tokens", 0), ("completion tokens", "completion_tokens", 0),
                               ("decode tok/s", "decode_tps", 1), ("finish", "finish_reason", 0)):
        lines.append(f"{label + ':':<19}{_n(old.get(key), digits):>12}  {_n(new.get(key), digits):>12}")
    for doc in (old, new):
        text = ((doc.get("capture") or {}).get("text") or "").replace("\n", " ")
        lines.append(f"text of {doc['id']}: {text[:200]!r}" if text else f"text of {doc['id']}: (not captured)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
