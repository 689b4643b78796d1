"""A study's table from its CSV rows: mean ± std over seeds, margins with Welch's p-values, cost ratios, the
search and x̂ sections, in markdown; the plots beside it (benchmarks/plots.py)."""

import datetime
import functools
import os
import statistics

from benchmarks.machine import describe
from benchmarks.plots import plot, plot_curves, plot_index
from benchmarks.variants import OURS, base_name, find_row, parse_grid, parse_variant, search_trials
from benchmarks.worker import INDEX_COLUMNS, INDEX_TIME, XHAT_COLUMNS, XHAT_NOISE_DROP, threads


def mean_std(values):
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def per_machine(rows, key):
    """The mean of a timing column over ``rows``, or "mixed machines" when they ran on different machines:
    seconds from a GPU and a CPU are never averaged together."""
    if len({r.get("machine") or "" for r in rows}) > 1:
        return "mixed machines"
    return f"{mean_std(r[key] for r in rows)[0]:.1f}"


def sharing(rows):
    """One line on what the rows' timings shared their machine with: the runs their batch ran at once and the 1-minute
    load average at their validations (``worker.COLUMNS``), or that older rows did not record it."""
    groups = {}
    for r in rows:
        if r.get("runs_at_once"):
            groups.setdefault(int(r["runs_at_once"]), []).append(r)
    parts = []
    for at_once, group in sorted(groups.items()):
        loads = [float(r["load_average"]) for r in group if r.get("load_average") not in (None, "")]
        load = ""
        if loads:
            spread = f"{min(loads):g}" + (f"–{max(loads):g}" if max(loads) > min(loads) else "")
            load = f", 1-minute load average {spread} at their validations"
        parts.append(f"{len(group)} row(s) ran {at_once} at once{load}")
    if unrecorded := len(rows) - sum(map(len, groups.values())):
        parts.append(f"{unrecorded} row(s) ran before rows recorded it (2026-12-07)")
    return "Sharing: " + "; ".join(parts) + " (the load counts work from outside the batch too)."


def compute_spent(rows):
    """One line on the run-hours the CSV's rows took (search points a table hides included): each run's wall-clock
    from its start to its test (``run_s``), summed per kind of machine; runs that shared a machine each count theirs."""
    timed = [r for r in rows if r.get("run_s") not in (None, "")]
    if not timed:
        return "Compute: no row recorded its run time."
    hours = {}
    for r in timed:
        kind = "GPU" if "NVIDIA" in (r.get("machine") or "") else "CPU"
        hours[kind] = hours.get(kind, 0.0) + float(r["run_s"]) / 3600
    spent = " and ".join(f"{h:.1f} run-hours on {kind}" for kind, h in sorted(hours.items()))
    return f"Compute: the CSV's {len(timed)} runs took {spent} (each run's wall-clock to its test, summed; runs that shared a machine each count theirs)."


def welch_p(a, b):
    """Welch's t-test p-value (two-sided) of two groups of seeds, or None when either has fewer than 2 values
    or both have no spread. Seeds are not paired across models, so the test is unpaired and unequal-variance."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2 or statistics.pstdev(a) == statistics.pstdev(b) == 0:
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def margin(rows, variants):
    """Each of the package's rows against the best built-in (by mean test NDCG@10): the difference of means
    of test NDCG@10 and Recall@10 with Welch's p-value over the seeds, and what the row reads that the
    built-ins do not, as markdown lines."""
    values = {v: {k: [float(r[k]) for r in rows if r["variant"] == v] for k in ("test_ndcg@10", "test_recall@10")} for v in variants}
    builtins = [v for v in variants if parse_variant(v)[0] not in OURS]
    ours = [v for v in variants if parse_variant(v)[0] in OURS]
    if not builtins or not ours:
        return []
    best = max(builtins, key=lambda v: statistics.mean(values[v]["test_ndcg@10"]))

    def cell(v, key):
        diff = statistics.mean(values[v][key]) - statistics.mean(values[best][key])
        p = welch_p(values[v][key], values[best][key])
        return f"{diff:+.4f} ({100 * diff / statistics.mean(values[best][key]):+.1f}%)", "—" if p is None else f"{p:.3g}"

    lines = [
        f"Margins over the best built-in by mean test NDCG@10, **{best}** ({len(values[best]['test_ndcg@10'])} seeds); "
        "p: Welch's t-test over the seeds (unpaired: seeds are not paired across models), — with fewer than 2 seeds.",
        "",
        "| model | seeds | test NDCG@10 vs best built-in | p | test Recall@10 vs best built-in | p | reads beyond the built-ins |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in ours:
        reads = sorted({r.get("reads") or "" for r in rows if r["variant"] == v} - {""})
        lines.append(
            f"| {v} | {len(values[v]['test_ndcg@10'])} | {' | '.join(cell(v, 'test_ndcg@10'))} | "
            f"{' | '.join(cell(v, 'test_recall@10'))} | {', '.join(reads) or '—'} |"
        )
    return lines + [""]


def in_process_ratio(rows, column="step_ratio_sasrec"):
    """The mean of a ratio each run measured against a reference in its own process (``step_ratio_sasrec``: its training
    cost per sequence over SASRec's; ``index_time_vs_dense``: its index's query time over the dense table's), with how
    many rows had one when not all did; "—" when none did. Such ratios hold their load in common, so runs of different
    machines are averaged."""
    values = [float(r[column]) for r in rows if r.get(column) not in (None, "")]
    if not values:
        return "—"
    return f"{statistics.mean(values):.2f}" + ("" if len(values) == len(rows) else f" ({len(values)} of {len(rows)} runs)")


def sasrec_ratio(rows, variant, variants):
    """s/epoch of ``variant`` over SASRec's, from runs on the same machine and day only (timings from different
    machines or days are never divided); None without such a pair. SASRec is the table's SASRec row."""
    reference = next((v for v in variants if parse_variant(v)[0] == "SASRec"), None)
    if reference is None:
        return None
    ratios = []
    for key in sorted({(r.get("machine"), r.get("date")) for r in rows if r["variant"] == variant}):
        mine = [float(r["train_s_per_epoch"]) for r in rows if r["variant"] == variant and (r.get("machine"), r.get("date")) == key]
        theirs = [float(r["train_s_per_epoch"]) for r in rows if r["variant"] == reference and (r.get("machine"), r.get("date")) == key]
        if theirs:
            ratios.append(statistics.mean(mine) / statistics.mean(theirs))
    return statistics.mean(ratios) if ratios else None


def title(variants):
    models = list(dict.fromkeys(parse_variant(v)[0] for v in variants))
    ours, builtins = [m for m in models if m in OURS], [m for m in models if m not in OURS]
    if ours and builtins:
        return f"{' and '.join(ours)} against RecBole's built-in models"
    return ", ".join(models) + (" and their variants" if len(variants) > len(models) else "")


def capped(rows, variant, config):
    """The rows of ``variant`` that the epoch cap stopped: epochs_run reached ``epochs`` while early stopping was still waiting.

    ``config`` is the Config of the variant's runs. RecBole stops early once ``stopping_step`` + 1 validations in a
    row failed to beat the best, so a run that reached the cap exactly then ended by early stopping (and a budget
    cuts runs below the cap).
    """
    cap, patience = config["epochs"], config["stopping_step"]
    return [
        r
        for r in rows
        if r["variant"] == variant and float(r["epochs_run"]) >= float(cap) and float(r["epochs_run"]) - float(r["best_epoch"]) <= float(patience)
    ]


def unfinished_search(rows, args, requested):
    """The header line of a table summarized before its --search finished (no search outcome to apply)."""
    seed = int(args.seeds.split(",")[0])
    trials = [t for ts in search_trials(requested, parse_grid(args.search)).values() for t in ts]
    done = [t for t in trials if find_row(rows, t, seed)]
    searched = ", ".join(dict.fromkeys(base_name(t) for t in done))
    return (
        f"Search: unfinished, {len(done)} of its {len(trials)} runs (seed {seed}, grid `{args.search}`) are in the CSV"
        f"{f' ({searched})' if searched else ''}; the rows below are those search points, one seed each, "
        "not yet each model's chosen point with every seed."
    )


def order(variant, requested, rows):
    """Where a variant's row goes: a requested one at its place, another (e.g. a search point of an unfinished search)
    after the requested variant of the same model, in the order the CSV got them."""
    names = [base_name(q) for q in requested]
    place = requested.index(variant) if variant in requested else names.index(base_name(variant)) + 0.5 if base_name(variant) in names else len(requested)
    return place, next(i for i, r in enumerate(rows) if r["variant"] == variant)


def summarize(study, rows, requested, commands, search=None):
    """Writes the table of ``rows`` (the study's CSV) to <out>/<dataset>.md with its plots, and prints it.

    ``study`` gives the options (``study.args``) and each variant's Config (``study.config``); ``requested`` are the
    variants asked for (a search's chosen points once it ended); ``commands`` the command lines that made the
    rows, one per study sharing the CSV; ``search`` the search's outcome, if it ended.
    """
    args = study.args
    # The requested variants first, then any other rows of the CSV but the search's unchosen points.
    hidden = {t for trials in (search or {}).get("trials", {}).values() for t in trials}
    variants = sorted({r["variant"] for r in rows if r["variant"] in requested or r["variant"] not in hidden}, key=lambda v: order(v, requested, rows))
    cap_of = lambda v: study.config(v)["epochs"]  # noqa: E731
    caps, patiences = {cap_of(v) for v in variants}, {study.config(v)["stopping_step"] for v in variants}
    cap = f"{next(iter(caps))} epochs" if len(caps) == 1 else "the epochs each variant sets"  # a variant may set its own
    patience = f"{next(iter(patiences))} validations" if len(patiences) == 1 else "the stopping_step each variant sets"
    lines = [
        f"# {args.dataset}: {title(variants)}",
        "",
        # Several studies may share one CSV (a plan's lines with the same --out and --dataset): one line each.
        *[f"Command: `{c}`  " for c in commands],
        f"Machine: {'; '.join(sorted({r.get('machine') or describe() for r in rows if r['variant'] in variants}))}; "
        f"date {', '.join(sorted({r.get('date') or datetime.date.today().isoformat() for r in rows if r['variant'] in variants}))}"
        ".  ",
        sharing([r for r in rows if r["variant"] in variants]) + "  ",
        compute_spent(rows) + "  ",
        "Protocol: leave-one-out by time, full ranking over all items, MAX_ITEM_LIST_LENGTH 50, early stopping on",
        "validation NDCG@10; test metrics of the best-validation checkpoint. Mean ± std over the seeds listed.",
        *(
            [
                f"Budget: each run had {args.time_budget:g} min of wall-clock from its start (data loading, training and validation; "
                f"the epoch in progress when it ran out was cut at that batch and validated); {args.jobs} run(s) at a time, "
                f"{threads(args.jobs)} torch thread(s) each. s/epoch is per run, extrapolated to a whole epoch where one was cut."
            ]
            if args.time_budget
            else []
        ),
        *(
            [
                f"Search: every model trained once with seed {search['seed']} at each of the {len(search['grid'])} settings below, "
                f"{'with the same budget per run' if args.time_budget else 'under the same stopping rule'}; the one with the best validation "
                f"NDCG@10 ran all seeds (its seed-{search['seed']} row is that search run). "
                "Ablations use their model's chosen settings."
            ]
            if search
            else []
        ),
        *([unfinished_search(rows, args, requested)] if args.search and not search else []),
        *(
            [
                f"Stopping: patience {patience} (a run ends once more validations than that in a row fail to beat its best "
                f"validation NDCG@10), at most {cap}. A run that the cap stopped before patience ran out is marked *cap* in the "
                "epochs column (*cap: k of n runs* when only some seeds were): it had not converged by this rule."
            ]
            if not args.time_budget
            else []
        ),
        "s/epoch ÷ SASRec: against the table's SASRec runs on the same machine and day only (— where there are none); "
        "step ÷ SASRec: training cost per sequence over RecBole's SASRec at its defaults, the two models' steps interleaved "
        "in each run's process after its test, so that load hits both alike (recorded since 2026-12-07); "
        "min to stop: training minutes until early stopping (s/epoch × epochs); timings of seeds that ran on different "
        "machines are not averaged (*mixed machines*).",
        "",
        *margin(rows, variants),
        "| model | seeds | test NDCG@10 | test Recall@10 | test MRR@10 | test NDCG@20 | valid NDCG@10 | params | s/epoch | "
        "s/epoch ÷ SASRec | step ÷ SASRec | eval s | epochs (best) | min to stop | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cap_mark(v):
        hit = capped(rows, v, study.config(v))
        if not hit:
            return ""
        return " *cap*" if len(hit) == sum(r["variant"] == v for r in rows) else f" *cap: {len(hit)} of {sum(r['variant'] == v for r in rows)} runs*"

    xhat_lines, index_lines = [], []
    ratio = functools.partial(sasrec_ratio, rows, variants=variants)
    for v in variants:
        mine = sorted((r for r in rows if r["variant"] == v), key=lambda r: int(r["seed"]))
        cell = lambda key: "{:.4f} ± {:.4f}".format(*mean_std(r[key] for r in mine))  # noqa: E731
        lines.append(
            f"| {v} | {','.join(str(r['seed']) for r in mine)} | {cell('test_ndcg@10')} | {cell('test_recall@10')} | "
            f"{cell('test_mrr@10')} | {cell('test_ndcg@20')} | {cell('valid_ndcg@10')} | {mine[0]['params']} | "
            f"{per_machine(mine, 'train_s_per_epoch')} | {'—' if ratio(v) is None else f'{ratio(v):.2f}'} | {in_process_ratio(mine)} | "
            f"{per_machine(mine, 'eval_s')} | "
            f"{mean_std(r['epochs_run'] for r in mine)[0]:.3g} ({mean_std(r['best_epoch'] for r in mine)[0]:.0f}){cap_mark(v)} | "
            f"{per_machine([{**r, 'train_min': float(r['train_s_per_epoch']) * float(r['epochs_run']) / 60} for r in mine], 'train_min')} | "
            f"{mean_std(r['peak_rss_mib'] for r in mine)[0]:.0f} |"
        )
        if all(r.get(c) not in (None, "") for r in mine for c in INDEX_COLUMNS):
            index_lines.append(
                f"| {v} | {cell('test_ndcg@10')} | {cell('test_recall@10')} | "
                + " | ".join("{:.4f} ± {:.4f}".format(*mean_std(r[c] for r in mine)) for c in INDEX_COLUMNS)
                + f" | {in_process_ratio(mine, INDEX_TIME)} |"
            )
        if all(r.get(c) not in (None, "") for r in mine for c in XHAT_COLUMNS):
            drops = [r.get(XHAT_NOISE_DROP) for r in mine]
            drop = "{:.4f} ± {:.4f}".format(*mean_std(drops)) if all(d not in (None, "") for d in drops) else "—"
            xhat_lines.append(f"| {v} | " + " | ".join("{:.3f} ± {:.3f}".format(*mean_std(r[c] for r in mine)) for c in XHAT_COLUMNS) + f" | {drop} |")
    if search:
        lines += [
            "",
            f"## Search (seed {search['seed']}, validation NDCG@10; test metrics were not looked at)",
            "",
            "| model | " + " | ".join(", ".join(f"{k}={v}" for k, v in point.items()) for point in search["grid"]) + " |",
            "|---|" + "---|" * len(search["grid"]),
        ]
        for v, trials in search["trials"].items():
            cells = []
            for t in trials:
                row = find_row(rows, t, search["seed"])
                cell = (
                    "failed"
                    if row is None
                    else (f"{float(row['valid_ndcg@10']):.4f} ({float(row['epochs_run']):.3g} ep{', cap' if row in capped(rows, t, study.config(t)) else ''})")
                )
                cells.append(f"**{cell}**" if t == search["chosen"][v] else cell)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if xhat_lines:
        lines += [
            "",
            "## x̂ on the validation split",
            "",
            "At the best epoch, as inference computes it (mean ± std over seeds): relative error",
            "|x̂ - x_next| / |x_next - x_L| pooled over users (1 = no better than copying x_L), and how often the true next",
            "item is the nearest item token to x̂ (hit@1) or among its 10 nearest (hit@10); whether the tower uses x̂:",
            "validation NDCG@10 with the served x̂ minus with x̂ replaced by Gaussian noise of the same norm (about 0 when",
            "the tower ignores x̂; — for runs from before it was recorded).",
            "",
            "| model | x̂ relative error | x̂ nearest-item hit@1 | x̂ nearest-item hit@10 | NDCG@10 drop, x̂ → noise |",
            "|---|---|---|---|---|",
            *xhat_lines,
        ]
    if index_lines:
        lines += [
            "",
            "## SparCode's sparse index",
            "",
            "The exact index of each quantized SparCode at its tested weights (posting lists for the keys the training split",
            "uses, every entry ReLU(s + b) > 0): the share of (key, item) entries it stores and its size. At threshold 0 it",
            "scores exactly as the model, so the test metrics are the index's (mean ± std over seeds). The CSR index stores 8",
            "bytes per entry at float32 (value and item index) against 4 for a dense table: it is the smaller below density 0.5.",
            "*time ÷ dense*: one query batch (256 validation histories, top 10) through the index over the same query through",
            "the dense table of the same scores, timed alternately in the run's process (— where not recorded, before",
            "2026-12-07): below 1 the posting lists are the faster way to serve.",
            "",
            "| model | test NDCG@10 | test Recall@10 | index density | index MiB | time ÷ dense |",
            "|---|---|---|---|---|---|",
            *index_lines,
        ]
    with open(os.path.join(args.out, f"{args.dataset}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(
        rows,
        variants,
        os.path.join(args.out, f"{args.dataset}.png"),
        args.dataset,
        args.time_budget,
        stopped_by_cap=[r for v in variants for r in capped(rows, v, study.config(v))],
    )
    if index_lines:
        plot_index(rows, variants, os.path.join(args.out, f"{args.dataset}_index.png"), args.dataset)
    if any(r.get("valid_curve") for r in rows if r["variant"] in variants):  # rows from before the column have none
        plot_curves(rows, variants, os.path.join(args.out, f"{args.dataset}_curves.png"), args.dataset, cap_of)
    print("\n".join(lines))
