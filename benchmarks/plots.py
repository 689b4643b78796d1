"""The plots of a benchmark table: accuracy against training cost, and validation curves per epoch."""

import json


def colours(variants):
    """One colour per variant, the same in every plot of a study (tab10, or tab20 past ten variants)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v: cmap(i % cmap.N) for i, v in enumerate(variants)}


def plot_curves(rows, variants, path, dataset, cap_of):
    """Validation NDCG@10 against epoch, a line per run (seeds of a variant share its colour), a dot at the best epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = colours(variants)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for v in variants:
        mine = sorted((r for r in rows if r["variant"] == v and r.get("valid_curve")), key=lambda r: int(r["seed"]))
        for i, r in enumerate(mine):
            curve = json.loads(r["valid_curve"])
            ax.plot(
                range(1, len(curve) + 1),
                curve,
                color=colour[v],
                linewidth=1.2,
                alpha=0.85,
                label=f"{v} ({len(mine)} seed{'s' if len(mine) > 1 else ''})" if i == 0 else None,
            )
            best = int(float(r["best_epoch"]))
            if 1 <= best <= len(curve):
                ax.plot([best], [curve[best - 1]], "o", color=colour[v], markersize=4)
    caps = {cap_of(v) for v in variants} - {None}
    if len(caps) == 1:  # one cap for every variant: drawn where the longest run reached it
        cap = float(caps.pop())
        if cap <= max((len(json.loads(r["valid_curve"])) for r in rows if r["variant"] in variants and r.get("valid_curve")), default=0):
            ax.axvline(cap, color="grey", linestyle=":", linewidth=1)
            ax.text(cap, ax.get_ylim()[0], f" cap {cap:g}", color="grey", fontsize=7, va="bottom")
    ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=f"{dataset}: validation NDCG@10 per epoch (dot: best epoch, whose weights are tested)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(variants) > 6 else 1)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(rows, variants, path, dataset, time_budget=None, stopped_by_cap=()):
    """Test NDCG@10 against training cost, a point per run.

    Without a budget the cost is the training time to early stopping. With one, every run trains for
    the same minutes, so the cost that tells the models apart is the time per epoch (how little of
    the data a slow model sees in the budget), on a log axis. Runs in ``stopped_by_cap`` (rows the
    epoch cap stopped before early stopping) are drawn hollow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if time_budget:
        cost = lambda r: float(r["train_s_per_epoch"])  # noqa: E731
    else:
        cost = lambda r: float(r["train_s_per_epoch"]) * float(r["epochs_run"]) / 60  # noqa: E731
    colour, at_cap = colours(variants), [id(r) for r in stopped_by_cap]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        for hollow in (False, True):
            part = [r for r in mine if (id(r) in at_cap) == hollow]
            if part:
                ax.scatter(
                    [cost(r) for r in part],
                    [float(r["test_ndcg@10"]) for r in part],
                    edgecolors=colour[v],
                    facecolors="none" if hollow else colour[v],
                    label=None if hollow and len(part) < len(mine) else v,
                )
    if time_budget:
        ax.set_xscale("log")
        plain = lambda v, _=None: f"{v:g}"  # noqa: E731  "600", not "6 x 10^2"
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(lambda v, _: plain(v) if plain(v)[0] in "25" else "")  # 20, 50, 200, 500
        ax.set(
            xlabel=f"training time per epoch (s, log scale); every run trained {time_budget:g} min",
            title=f"{dataset}: accuracy vs cost per epoch, equal time budget",
        )
    else:
        ax.set(
            xlabel="training time to early stop (min)" + ("; hollow: stopped by the epoch cap" if stopped_by_cap else ""),
            title=f"{dataset}: accuracy vs training time",
        )
    ax.set_ylabel("test NDCG@10")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2 if len(variants) > 6 else 1)  # below the axes: never over a point
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_index(rows, variants, path, dataset):
    """Test NDCG@10 against the size of the exact sparse index, a point per SparCode run that recorded one (the
    trade-off a score bias and a sparsity weight buy: a smaller index for what accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = colours(variants)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v and r.get("index_mib") not in (None, "")]
        if mine:
            ax.scatter([float(r["index_mib"]) for r in mine], [float(r["test_ndcg@10"]) for r in mine], color=colour[v], label=v)
    ax.set(xlabel="exact sparse index (MiB; keys of the training split, threshold 0)", ylabel="test NDCG@10", title=f"{dataset}: accuracy vs index size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2 if len(variants) > 6 else 1)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
