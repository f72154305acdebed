"""torchdiffopt beside its peers (qpth, cvxpylayers) on the peers' own workloads.

    python benchmarks/run.py --quick                 # correctness at small sizes (< 2 min)
    python benchmarks/run.py --full                  # timings; writes benchmarks/results/
    python benchmarks/run.py --full --solvers highs,qpth --only W1,W2

Every method runs in this one process on the same data. Per workload and method it reports
forward, backward and total time (median of the timed repetitions after a warm-up), peak
memory growth (resident set, see ``harness.py``), the time ratio to each peer, the solution
error against a KKT-certified reference, the gradient error against central finite
differences (a few random directions) and the gradient difference to each peer.

Workloads: W1 OptNet random QP (qpth's generator), W2 decision-focused QP, W3 shortest path
(exact LP and QPTL-smoothed), W4 SOCP portfolio (conic backend), W5 non-negative least
squares, W6 Jacobian-vector products along k directions (Sobolev), W7 backward time against
one batched LU factorization + solve of the same size.

``--quick`` asserts accuracy, never times: our gradients within 1e-5 of central differences,
our solutions within 1e-6 of the reference, no failed members, and our gradients within 1e-4
of each peer's, on the members that peer solved to 1e-6, wherever that peer's own gradient
passes the central-difference check (a peer that fails it is reported, not used as an
oracle: cvxpylayers' LSQR backward misses by up to 4e-2 here). It exits with status 1 on
any failure. Solvers named in ``--solvers`` that torchdiffopt does not have
(yet) are skipped with a note; peers that are not installed likewise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import time
import warnings

import torch

import harness
import peers
import report
import torchdiffopt
from workloads import decision_qp, floor, nnls, optnet, portfolio, shortest_path, sobolev

CASE_WORKLOADS = {"W1": optnet, "W2": decision_qp, "W3": shortest_path, "W4": portfolio,
                  "W5": nnls}
QUICK_FD_TOLERANCE = 1e-5
QUICK_SOLUTION_TOLERANCE = 1e-6
QUICK_ADJOINT_TOLERANCE = 1e-8
#: largest gradient difference to a peer (relative ∞-norm, members it solved to 1e-6)
QUICK_PEER_TOLERANCE = 1e-4
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The processor's name (Linux: ``/proc/cpuinfo``), else what ``platform`` says: the
    ratios against the peers move with it (README, Performance)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def source_commit() -> str:
    """The torchdiffopt checkout's commit (short hash, "+ changes" where its package or
    benchmark code differs from it), or "unknown" outside a git checkout."""
    root = pathlib.Path(torchdiffopt.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                  "--untracked-files=no", "--", "torchdiffopt", "benchmarks",
                                  ":(exclude)benchmarks/results"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + changes" if changed else "")


def header() -> dict:
    versions = {"torch": torch.__version__,
                "torchdiffopt": getattr(torchdiffopt, "__version__", "dev")}
    for name in ("qpth", "cvxpylayers", "cvxpy", "diffcp", "scs", "clarabel", "highspy",
                 "daqp"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {"machine": f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPU cores, "
                       f"{platform.system()}",
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "versions": versions, "commit": source_commit(),
            "load_average_at_start": os.getloadavg()}


def quick_failures(runs, sobolev_rows) -> list[str]:
    """Accuracy failures of a --quick run (times are never checked); ``runs`` holds
    ``(case, results)`` pairs."""
    failures = []
    for case, results in runs:
        fd_ok = {r.method: r.fd_error is not None and r.fd_error <= QUICK_FD_TOLERANCE
                 for r in results}
        failures += _case_failures(case, results, fd_ok)
    for row in sobolev_rows:
        err = row.get("adjoint_error")
        if err is not None and err > QUICK_ADJOINT_TOLERANCE:
            failures.append(f"W6 {row['method']} k={row['k']}: adjoint identity error {err:.1e}")
    return failures


def _case_failures(case, results, fd_ok) -> list[str]:
    failures = []
    for r in (r for r in results if r.kind == "ours"):
        tag = f"{r.workload} {r.case} {r.method}"
        if r.status == "failed":
            failures.append(f"{tag}: {r.note}")
        if r.status != "ok":
            continue
        if r.failed_members:
            failures.append(f"{tag}: {r.failed_members} failed members")
        if r.fd_error is not None and r.fd_error > QUICK_FD_TOLERANCE:
            failures.append(f"{tag}: gradient error vs central differences "
                            f"{r.fd_error:.1e} > {QUICK_FD_TOLERANCE:.0e}")
        if r.solution_error is None or r.solution_error > QUICK_SOLUTION_TOLERANCE:
            failures.append(f"{tag}: solution error vs reference {r.solution_error}")
        for peer, err in r.certified_peer_gradient_error.items():
            if case.compare_peer_gradients and fd_ok[peer] and err is not None \
                    and err > QUICK_PEER_TOLERANCE:
                failures.append(f"{tag}: gradient difference to {peer} {err:.1e} > "
                                f"{QUICK_PEER_TOLERANCE:.0e}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="small sizes, assert accuracy")
    mode.add_argument("--full", action="store_true", help="full sizes, write results/")
    parser.add_argument("--solvers", default="auto,highs,ipm,qpth",
                        help="torchdiffopt solvers to time (comma-separated)")
    parser.add_argument("--only", default="W1,W2,W3,W4,W5,W6,W7",
                        help="workloads to run (comma-separated)")
    parser.add_argument("--reps", type=int, default=11,
                        help="timed repetitions (median); 5 left W4's medians 10-20 %% apart "
                             "between two runs of one method")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed repetitions per method and case: a slower "
                             "method gets fewer repetitions (at least one)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    solvers = [s for s in args.solvers.split(",") if s]
    only = set(args.only.split(","))
    reps = 1 if args.quick else args.reps
    warnings.simplefilter("ignore")  # each method's warnings are recorded in its note

    info = header()
    start = time.perf_counter()
    lines = [f"# torchdiffopt benchmarks ({'quick' if args.quick else 'full'})", "",
             f"Machine: {info['machine']}; Python {info['python']}; torch "
             f"{info['versions']['torch']} ({info['torch_threads']} threads).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
             + f"; torchdiffopt's code at commit {info['commit']}.", ""]
    lines += [report.LEGEND, ""] + [f"- {note}" for note in peers.availability_notes()]
    print("\n".join(lines), flush=True)

    runs: list[tuple[harness.Case, list[harness.Result]]] = []
    for key, module in CASE_WORKLOADS.items():
        if key not in only:
            continue
        cases = module.cases(args.quick, solvers)
        for case in cases:
            found = harness.measure(case, reps, args.budget)
            harness.evaluate(case, found, seed=len(runs))
            runs.append((case, found))
            block = [f"\n## {case.workload} {case.label}", ""] + report.case_table(found)
            block += [f"- {note}" for note in case.notes]
            print("\n".join(block), flush=True)
            lines += block

    results = [r for _, found in runs for r in found]
    sobolev_rows, floor_rows = [], []
    if "W6" in only:
        sobolev_rows, notes = sobolev.run(args.quick, solvers, max(reps, 3))
        block = ["\n## W6 Jacobian-vector products along k directions", ""]
        block += report.sobolev_table(sobolev_rows) + [f"- {n}" for n in notes]
        print("\n".join(block), flush=True)
        lines += block
    if "W7" in only:
        floor_rows = floor.run(results, max(reps, 3))
        block = ["\n## W7 backward time against one batched LU factorization + solve", ""]
        block += report.floor_table(floor_rows)
        print("\n".join(block), flush=True)
        lines += block

    block = [] if args.quick else ["\n## Targets", "", "The default method (`solver=\"auto\"`; for W4's conic "
             "layer Clarabel) against each peer's faster variant; speedup = peer time / our "
             "time."]
    if block:
        block += [""] + report.verdict_table(runs, sobolev_rows, floor_rows)
        block += ["", "Summary: the default method beside each peer's fastest variant "
                  "(in parentheses: members farther than 1e-4 from the reference)."]
        block += [""] + report.summary_table(runs)
        print("\n".join(block), flush=True)
        lines += block

    elapsed = time.perf_counter() - start
    info["run_seconds"], info["load_average_at_end"] = elapsed, os.getloadavg()
    block = [f"\nTotal run time: {elapsed:.0f} s; load average (1, 5, 15 min) at the start "
             f"{_loads(info['load_average_at_start'])}, at the end "
             f"{_loads(info['load_average_at_end'])} (on {os.cpu_count()} cores)."]
    print("\n".join(block), flush=True)
    lines += block
    if args.full:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text("\n".join(lines) + "\n")
        (args.out / "results.json").write_text(report.to_json(results, sobolev_rows,
                                                              floor_rows, info))
        written = report.plots(results, args.out)
        print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'}, "
              + ", ".join(written))
        return 0

    failures = quick_failures(runs, sobolev_rows)
    checked = sum(r.fd_error is not None for r in results)
    worst = max((r.fd_error for r in results if r.kind == "ours" and r.fd_error is not None),
                default=None)
    print(f"\ngradient errors checked for {checked} method/case pairs; largest of ours vs "
          f"central differences: {_fmt(worst)}")
    if failures:
        print("ACCURACY FAILURES:\n  " + "\n  ".join(failures))
        return 1
    print("quick run: all accuracy checks passed")
    return 0


def _fmt(value):
    return "–" if value is None else f"{value:.1e}"


def _loads(loads):
    return ", ".join(f"{x:.1f}" for x in loads)


if __name__ == "__main__":
    sys.exit(main())
