"""What `loadtest.bench_load` concludes: the throughput ratios, the targets, and its Markdown report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loadtest.images import ATTRIBUTION

Json = dict[str, Any]
BASELINES = ("naive", "naive-tuned", "keras")
# The targets set for this benchmark: throughput ratios at the highest concurrency (32 by default).
TARGETS = {"naive": 2.0, "keras": 5.0}


def ratios(results: Json, concurrency: Sequence[int]) -> Json:
    """ours / baseline throughput, and baseline / ours p50 latency, at each concurrency."""
    ours = {step["concurrency"]: step for step in results["ours"]["closed_loop"]}
    out: Json = {}
    for baseline in BASELINES:
        theirs_result = results.get(baseline, {})
        if "closed_loop" not in theirs_result:
            continue
        theirs = {step["concurrency"]: step for step in theirs_result["closed_loop"]}
        per_c: Json = {}
        for c in concurrency:
            a, b = ours.get(c), theirs.get(c)
            if a is None or b is None:
                continue
            p50a, p50b = a["latency_ms"]["p50"], b["latency_ms"]["p50"]
            per_c[str(c)] = {
                "throughput": a["throughput_img_s"] / b["throughput_img_s"] if b["throughput_img_s"] else None,
                "p50_latency_theirs_over_ours": p50b / p50a if p50a and p50b else None,
            }
        out[f"ours_vs_{baseline}"] = per_c
    return out


def targets(report: Json) -> Json:
    """The targets, checked on this run's figures (None where not measured)."""
    top = str(max(report["config"]["concurrency"]))
    out: Json = {}
    for baseline, wanted in TARGETS.items():
        key = f"ours_vs_{baseline}_at_c{top}"
        ratio = report["ratios"].get(f"ours_vs_{baseline}", {}).get(top, {}).get("throughput")
        out[key] = {"wanted": wanted, "measured": ratio, "met": None if ratio is None else ratio >= wanted}
        theirs = report["config"].get("split_bundle_precision")
        if baseline.startswith("naive") and theirs not in (None, report["config"]["bundle_precision"]):
            out[key]["like_for_like"] = False  # e.g. our INT8 bundle vs the naive fp32 graphs: say so
    overload = report["servers"]["ours"]["overload"]
    out["overload_only_503_and_recovers"] = {
        "met": bool(overload["only_503_refusals"] and overload["recovered"].get("status") == 200),
        "other_5xx": overload["other_5xx"],
        "recovered_status": overload["recovered"].get("status"),
    }
    bound = overload["boundedness"]
    out["overload_accepted_p99_bounded"] = {
        "met": bound["bounded"],
        "accepted_p99_ms": bound["accepted_p99_ms"],
        "first_half_p99_ms": bound["accepted_p99_first_half_ms"],
        "second_half_p99_ms": bound["accepted_p99_second_half_ms"],
        "full_queue_ms_at_achieved_rate": bound["full_queue_ms_at_achieved_rate"],
    }
    return out


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _errors(step: Json) -> str:
    return ", ".join(f"{status}: {count}" for status, count in sorted(step["errors"].items())) or "none"


def _batches(step: Json) -> str:
    batches = step.get("batch_sizes")
    if not batches or not batches["batches"]:
        return "-"
    histogram = " ".join(f"{k}:{v}" for k, v in batches["histogram"].items())
    return f"{batches['mean_batch_size']:.1f} ({histogram})"


def render_markdown(report: Json) -> str:
    machine, config, servers = report["machine"], report["config"], report["servers"]
    lines = [
        "# Load benchmark: our service vs naive ONNX vs original-style Keras",
        "",
        f"{machine['cpu_model']}, {machine['usable_cores']} usable cores, {machine['memory_gib']} GiB, "
        f"onnxruntime {machine['onnxruntime']}, Python {machine['python']}; load average at start "
        f"{machine['load_average_at_start']}, at end {machine.get('load_average_at_end')}. Started "
        f"{report['started_at']}.",
        "",
        f"Bundle `{config['bundle']}` ({config.get('bundle_precision', '?')}; the naive baseline runs "
        f"`{config.get('split_bundle', '-')}`, {config.get('split_bundle_precision', '-')}); "
        f"{config['uploads']} JPEG uploads ({config['upload_kb_min_max'][0]:.0f}-"
        f"{config['upload_kb_min_max'][1]:.0f} KB, longest side {config['upload_sides_px']} px). Each step: "
        f"{config['warmup_s']:g} s warm-up (not counted), then {config['duration_s']:g} s measured. The load "
        "generator runs on the same machine (its CPU% is the 'client CPU' column).",
        "",
        "## Closed loop (each client sends its next request when the last one is answered)",
        "",
        "| server | concurrency | img/s | p50 ms | p90 ms | p99 ms | n | errors | server CPU % | client CPU % "
        "| other CPU % | server RSS MB (max) | mean batch (histogram) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in config["concurrency"]:
        for name in ("ours", *BASELINES):
            steps = {s["concurrency"]: s for s in servers.get(name, {}).get("closed_loop", [])}
            if c not in steps:
                continue
            step = steps[c]
            latency = step["latency_ms"]
            lines.append(
                f"| {name} | {c} | {step['throughput_img_s']:.1f} | {_f(latency['p50'])} | {_f(latency['p90'])} | "
                f"{_f(latency['p99'])} | {latency['n']} | {_errors(step)} | {step['server_cpu_percent']:.0f} | "
                f"{step['client_cpu_percent']:.0f} | {step['other_cpu_percent']:.0f} | "
                f"{step['server_rss_mb']['max']:.0f} | {_batches(step)} |"
            )
    for name in BASELINES:
        for outcome in ("skipped", "failed"):
            if outcome in servers.get(name, {}):
                lines.append(f"\n{name}: {outcome} ({servers[name][outcome]})")
    started = [
        f"{name} {servers[name]['load_average_at_start']}"
        for name in servers
        if "load_average_at_start" in servers[name]
    ]
    lines += ["", f"Load average (1, 5, 15 min) when each server started: {', '.join(started)}."]
    lines += ["", "## Ratios (ours / baseline throughput; baseline / ours p50 latency)", ""]
    lines += ["| vs | concurrency | throughput ratio | p50 latency ratio |", "|---|---|---|---|"]
    for key, per_c in report["ratios"].items():
        for c, value in per_c.items():
            lines.append(
                f"| {key.removeprefix('ours_vs_')} | {c} | {_f(value['throughput'], 2)}x | "
                f"{_f(value['p50_latency_theirs_over_ours'], 2)}x |"
            )
    ours = servers["ours"]
    lines += [
        "",
        f"## Our service, open loop (Poisson arrivals; capacity = best closed-loop throughput, "
        f"{ours['capacity_img_s']:.1f} img/s)",
        "",
        "Latency is from each request's scheduled send time. 'accepted' are 200s; 'refused' are 503s.",
        "",
        "| offered | rate img/s | accepted | refused 503 (with Retry-After) | other 5xx | transport errors "
        "| accepted p50 / p90 / p99 ms | refused p99 ms | send lag p99 ms | server / client / other CPU % "
        "| RSS MB before / max | max queue depth | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in [*ours["open_loop"], ours["overload"]]:
        latency, refused = step["latency_ms"], step["refused_latency_ms"]
        lines.append(
            f"| {step['fraction_of_capacity']:.0%} ({step['seconds']:g} s) | {step['offered_rate_img_s']:.1f} | "
            f"{step['accepted']} | {step['refused_503']} ({step['refused_503_with_retry_after']}) | "
            f"{step['other_5xx']} | {step['transport_errors']} | {_f(latency['p50'])} / {_f(latency['p90'])} / "
            f"{_f(latency['p99'])} | {_f(refused['p99'])} | {_f(step['send_lag_ms']['p99'])} | "
            f"{step['server_cpu_percent']:.0f} / {step['client_cpu_percent']:.0f} / {step['other_cpu_percent']:.0f} | "
            f"{step['server_rss_mb']['before']:.0f} / "
            f"{step['server_rss_mb']['max']:.0f} | {_f(step.get('queue_depth_max'))} | {_batches(step)} |"
        )
    overload = ours["overload"]
    rss, recovered, bound = overload["rss_mb"], overload["recovered"], overload["boundedness"]
    lines += [
        "",
        f"Overload: RSS {rss['before']:.0f} MB before, {rss['during_max']:.0f} MB max during, {rss['after']:.0f} MB "
        f"after; the request sent right after answered {recovered.get('status')} in "
        f"{recovered['latency_ms']:.0f} ms; only 503 refusals: {overload['only_503_refusals']}; in-flight requests "
        f"drained {overload['drain_after_window_s']:.1f} s after the last arrival. Accepted p99 "
        f"{_f(bound['accepted_p99_ms'])} ms (first half {_f(bound['accepted_p99_first_half_ms'])}, second half "
        f"{_f(bound['accepted_p99_second_half_ms'])}); a full queue (max_queue_size {bound['max_queue_size']} + "
        f"max_batch_size {bound['max_batch_size']}) takes {_f(bound['full_queue_ms_at_capacity'])} ms to serve at "
        f"the closed-loop capacity, {_f(bound['full_queue_ms_at_achieved_rate'])} ms at the "
        f"{bound['achieved_img_s']:.1f} img/s achieved during the overload.",
        "",
        "## Same answers",
        "",
    ]
    for name in BASELINES:
        check = servers.get(name, {}).get("answer_vs_ours")
        if check and check.get("comparable"):
            lines.append(
                f"- {name} vs ours on `{servers['ours']['answer']['image']}`: same body part "
                f"{check['same_body_part']}, |Δ P(fractured)| {check['p_fractured_abs_diff']:.2g}"
            )
    lines += ["", "## Targets", ""]
    for key, value in report["targets"].items():
        detail = ", ".join(f"{k} {_f(v, 2) if isinstance(v, float) else v}" for k, v in value.items() if k != "met")
        lines.append(
            f"- {key}: {'met' if value['met'] else 'NOT met' if value['met'] is False else 'not measured'} ({detail})"
        )
    lines += ["", ATTRIBUTION, "Research use only; the demo bundle is untrained, so only speed is meaningful.", ""]
    return "\n".join(lines)
