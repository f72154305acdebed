"""Formatting the results: markdown tables (console and results.md), JSON and PNG plots."""

from __future__ import annotations

import dataclasses
import json

from harness import REWARM_BELOW_S, Result


LEGEND = f"""\
Columns: times are medians over `reps` timed repetitions after one warm-up (forward, backward,
and their sum per repetition; methods take turns, in a new order each round, and one whose warm-up took under
{REWARM_BELOW_S:g} s makes an untimed call right before each timed one, since a short call timed
right after another method's runs up to 3× slower); `peak MiB` is the growth of the process's peak resident set
during one forward + backward (Linux VmHWM after malloc_trim and a reset through
/proc/self/clear_refs: torch, numpy and native solver memory, not tracemalloc); `failed` counts
batch members a method reported as failed (NaN); `sol err (wrong)` is the largest relative
∞-norm distance of a member's solution to the KKT-certified reference (torchdiffopt with SCS,
polished; HiGHS where SCS fails) and, in parentheses, the number of members farther than 1e-4;
`FD err` is the largest |⟨∇, v⟩ − central difference| / max(1, |central difference|) over 3
random directions (each on at most two batch members, step 1e-6, differences of the
reference); `× peer` is this method's total time over the peer's (> 1: slower than the peer);
`Δ∇ peer` is max |∇ − ∇_peer| / max(1, max |∇_peer|) over the members both solved."""


def _ms(seconds):
    return "–" if seconds is None else f"{1e3 * seconds:.3g}"


def _err(value):
    return "–" if value is None else ("0" if value == 0 else f"{value:.0e}")


def _num(value, fmt="{:.3g}"):
    return "–" if value is None else fmt.format(value)


def case_table(results: list[Result]) -> list[str]:
    """One markdown table for one case: a row per method."""
    peers = [r.method for r in results if r.kind == "peer" and r.status == "ok"]
    head = ["method", "fwd ms", "bwd ms", "total ms", "peak MiB", "reps", "failed",
            "sol err (wrong)", "FD err"]
    head += [f"× {p}" for p in peers] + [f"Δ∇ {p}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in results:
        if r.status != "ok":
            notes.append(f"{r.method}: {r.status}: {r.note}")
            continue
        if r.note:
            notes.append(f"{r.method}: {r.note}")
        row = [r.method, _ms(r.forward_s), _ms(r.backward_s), _ms(r.total_s),
               _num(r.peak_mib, "{:.0f}"), str(r.reps), str(r.failed_members),
               f"{_err(r.solution_error)} ({r.wrong_members})", _err(r.fd_error)]
        row += ["–" if p == r.method else _num(r.time_ratio.get(p), "{:.2f}") for p in peers]
        row += ["–" if p == r.method else _err(r.peer_gradient_error.get(p)) for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [f"- {n}" for n in notes]


def sobolev_table(rows) -> list[str]:
    lines = ["| method | mode | k | time ms | solve ms | derivative ms | time(k)/time(k=1) "
             "| adjoint err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mode']} | {r['k']} | {_ms(r['time_s'])} | "
                     f"{_ms(r.get('solve_s'))} | {_ms(r.get('derivative_s'))} | "
                     f"{r['ratio_to_k1']:.2f} | {_err(r.get('adjoint_error'))} |")
    return lines


def floor_table(rows) -> list[str]:
    lines = ["| workload | case | method | KKT order | backward ms | of it, the workload's graph "
             "ms | LU+solve ms | solve ms | bwd / (LU+solve) | bwd / solve |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['case']} | {r['method']} | {r['kkt_order']} | "
                     f"{_ms(r['backward_s'])} | {_ms(r.get('graph_backward_s'))} | "
                     f"{_ms(r['factor_solve_s'])} | "
                     f"{_ms(r['solve_s'])} | {r['ratio_factor_solve']:.1f} | "
                     f"{r['ratio_solve']:.1f} |")
    return lines


def to_json(results, sobolev, floor, header) -> str:
    skip = {"x", "grads"}
    records = [{k: v for k, v in dataclasses.asdict(r).items() if k not in skip}
               for r in results]
    return json.dumps({"header": header, "results": records, "sobolev": sobolev,
                       "floor": floor}, indent=1, default=str)


def plots(results, directory) -> list[str]:
    """W1's total time against the problem size (one panel per batch) and against the batch
    size (one panel per problem size), one line per method. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w1 = [r for r in results if r.workload == "W1" and r.status == "ok"]
    methods = sorted({r.method for r in w1})
    written = []
    for x_key, panel_key, name in (("n", "batch", "w1_time_vs_size.png"),
                                   ("batch", "n", "w1_time_vs_batch.png")):
        panels = sorted({r.params[panel_key] for r in w1})
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4),
                                 squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for m in methods:
                pts = sorted((r.params[x_key], r.total_s) for r in w1
                             if r.method == m and r.params[panel_key] == panel)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set(xscale="log", yscale="log", title=f"W1, {panel_key} = {panel}",
                   xlabel=x_key, ylabel="forward + backward time (s)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = directory / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


#: the speed targets of the performance issue: workload → (peer name prefix, least speedup)
SPEED_TARGETS = {
    "W1": (("qpth", 2.0), ("cvxpylayers", 10.0)),
    "W2": (("qpth", 4.0), ("cvxpylayers", 20.0)),
    "W3": (("cvxpylayers", 5.0),),
    "W4": (("cvxpylayers", 3.0),),
    "W5": (("qpth", 1.0), ("cvxpylayers", 1.0)),
}
#: W1's gradient accuracy target, against central differences
W1_GRADIENT_TOL = 1e-5
#: W6: time(k = 50) / time(k = 1) at most; W7: backward / (LU + solve) at most
SOBOLEV_TARGET, FLOOR_TARGET = 2.0, 2.0


def default_method(results: list[Result]) -> Result | None:
    """The method a user gets without choosing: ``torchdiffopt[auto]`` where it ran, else
    the first of ours that did."""
    ours = [r for r in results if r.kind == "ours" and r.status == "ok"]
    auto = [r for r in ours if r.method == "torchdiffopt[auto]"]
    return (auto or ours or [None])[0]


def verdict_table(runs, sobolev_rows, floor_rows) -> list[str]:
    """One row per target and case: the default method's speedup over each peer's fastest
    variant (``cvxpylayers`` is judged by the quicker of its SCS and Clarabel runs), and
    whether the target is met."""
    lines = ["| workload | case | ours | target | measured | met |", "|---|---|---|---|---|---|"]
    for case, results in runs:
        ours = default_method(results)
        if ours is None:
            continue
        for peer, least in SPEED_TARGETS.get(case.workload, ()):
            times = [r.total_s for r in results
                     if r.kind == "peer" and r.status == "ok" and r.method.startswith(peer)]
            if not times:
                continue
            speedup = min(times) / ours.total_s
            lines.append(f"| {case.workload} | {case.label} | {ours.method} | ≥ {least:g}× "
                         f"faster than {peer} | {speedup:.2f}× | "
                         f"{'yes' if speedup >= least else 'no'} |")
        if case.workload == "W1" and ours.fd_error is not None:
            lines.append(f"| W1 | {case.label} | {ours.method} | gradient error ≤ "
                         f"{W1_GRADIENT_TOL:g} | {ours.fd_error:.0e} | "
                         f"{'yes' if ours.fd_error <= W1_GRADIENT_TOL else 'no'} |")
    by_method = {}
    for r in sobolev_rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rows in by_method.items():
        last = rows[-1]
        if method.startswith("torchdiffopt"):
            lines.append(f"| W6 | k = {last['k']} | {method} ({last['mode']}) | time(k) / "
                         f"time(k=1) ≤ {SOBOLEV_TARGET:g} | {last['ratio_to_k1']:.2f} | "
                         f"{'yes' if last['ratio_to_k1'] <= SOBOLEV_TARGET else 'no'} |")
    for r in floor_rows:
        if r["method"] == "torchdiffopt[auto]" or not any(
                f["method"] == "torchdiffopt[auto]" for f in floor_rows):
            ratio = r["ratio_factor_solve"]
            lines.append(f"| W7 | {r['workload']} {r['case']} | {r['method']} | backward ≤ "
                         f"{FLOOR_TARGET:g} × (LU + solve) | {ratio:.2f} | "
                         f"{'yes' if ratio <= FLOOR_TARGET else 'no'} |")
    return lines


def summary_table(runs) -> list[str]:
    """One row per case: the default method's total time and gradient error beside each
    peer's fastest variant (time, and the members it got wrong: farther than 1e-4 from the
    reference), for README."""
    lines = ["| case | torchdiffopt ms | its FD err | qpth ms (wrong) | cvxpylayers ms (wrong) |"
             " speedup vs qpth | vs cvxpylayers |", "|---|---|---|---|---|---|---|"]
    for case, results in runs:
        ours = default_method(results)
        if ours is None:
            continue
        cells, speedups = [], []
        for peer in ("qpth", "cvxpylayers"):
            ok = [r for r in results
                  if r.kind == "peer" and r.status == "ok" and r.method.startswith(peer)]
            best = min(ok, key=lambda r: r.total_s, default=None)
            if best is None:
                cells.append("–")
                speedups.append("–")
                continue
            cells.append(f"{_ms(best.total_s)} ({best.wrong_members})")
            speedups.append(f"{best.total_s / ours.total_s:.2f}×")
        lines.append(f"| {case.workload} {case.label} | {_ms(ours.total_s)} | "
                     f"{_err(ours.fd_error)} | {' | '.join(cells)} | {' | '.join(speedups)} |")
    return lines
