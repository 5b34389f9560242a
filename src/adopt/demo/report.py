"""Turn the demo's numbers into a stdout table, a plain-language reading, and a figure.

Every sentence of the reading is computed from the results, so it stays true for any
``--steps``/``--seeds``/``--epochs``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .toy import BETA2S, CLIP_CATCH_UP_STEP, K, TURN_TOLERANCE, OPTIMIZERS as TOY_OPTIMIZERS

NEAR = 0.5  # |mean θ| beyond this counts as "near" an end of [-1, 1]
COLORS = {
    "Adam": "tab:red",
    "AMSGrad": "tab:orange",
    "ADOPT (no clip)": "tab:blue",
    "ADOPT (default clip)": "tab:cyan",
    "ADOPT": "tab:blue",
    "AdamW": "tab:purple",
}
# AdamW differs from Adam only by a small decoupled weight decay; dashes keep it visible on top.
LINESTYLES = {"AdamW": "--", "AMSGrad": "--"}  # dashed: the line drawn under them shows through


def _pm(mean: float, std: float, digits: int = 2, sign: bool = False) -> str:
    """``mean +- std`` with a fixed number of decimals."""
    fmt = f"{'+' if sign else ''}.{digits}f"
    return f"{mean:{fmt}} +- {std:.{digits}f}"


def toy_table(toy: dict[str, Any]) -> str:
    """Final θ per optimizer (rows) and β2 (columns)."""
    setup = toy["setup"]
    lines = [
        f"Toy problem: final theta after {setup['steps']} steps, mean +- std over {setup['seeds']} seeds"
        " (optimum -1, wrong end +1)",
        f"{'optimizer':<22}" + "".join(f"{'beta2=' + str(b):>17}" for b in BETA2S),
    ]
    for name in TOY_OPTIMIZERS:
        cells = [toy["optimizers"][name][str(b)] for b in BETA2S]
        lines.append(f"{name:<22}" + "".join(f"{_pm(c['final_mean'], c['final_std'], sign=True):>17}" for c in cells))
    return "\n".join(lines)


def digits_table(digits: dict[str, Any]) -> str:
    """Test accuracy and final training loss per optimizer (rows) and setting (columns)."""
    setup = digits["setup"]
    settings = list(digits["settings"])
    lines = [
        f"Digits MLP: test accuracy (%) mean +- std over {setup['seeds']} seeds after {setup['epochs']} epochs,"
        " and final training loss (mean)",
        f"{'optimizer':<10}" + "".join(f"{s:>34}" for s in settings),
    ]
    for name in digits["results"][settings[0]]:
        cells = []
        for s in settings:
            r = digits["results"][s][name]
            acc = _pm(100 * r["test_accuracy_mean"], 100 * r["test_accuracy_std"])
            cells.append(f"{acc}  loss {r['train_loss_mean'][-1]:.2e}")
        lines.append(f"{name:<10}" + "".join(f"{c:>34}" for c in cells))
    return "\n".join(lines)


PRECISION_COLORS = {"float32": "black", "bfloat16, nearest": "tab:red", "bfloat16, stochastic": "tab:cyan"}
# float32 solid and wide, stochastic rounding dashed on top: where they coincide both show.
PRECISION_STYLES = {"float32": ("-", 2.6), "bfloat16, nearest": ("-", 1.6), "bfloat16, stochastic": ("--", 1.6)}
PRECISION_TASKS = {"digits": "digits MLP", "charlm": "char-level LM"}


def _task_title(task: str, result: dict[str, Any]) -> str:
    setup = result["setup"]
    length = f"{setup['epochs']} epochs" if setup["unit"] == "epoch" else f"{setup['steps']} steps"
    return f"{PRECISION_TASKS[task]} (lr {setup['lr']:g}, {length})"


def precision_table(precision: dict[str, Any]) -> str:
    """Final train and validation loss per task and variant, with the change against float32."""
    seeds = precision["setup"]["seeds"]
    lines = [
        f"Pure bfloat16 training with ADOPT: final loss (nats, computed in float32), mean +- std over {seeds} seeds;"
        " in brackets the change against float32; 'matches' = within max(2 %, 2 seed-std) of float32",
        f"{'task':<38}{'parameters':<24}{'train loss':>28}{'validation loss':>28}  matches float32",
    ]
    for task, result in precision["tasks"].items():
        title = _task_title(task, result)
        for name, cell in result["summary"].items():
            *parts, verdict = _loss_cells(cell, name, "float32")
            lines.append(f"{title:<38}{name:<24}{parts[0]:>28}{parts[1]:>28}  {verdict}")
            title = ""
    return "\n".join(lines)


def _loss_cells(cell: dict[str, Any], name: str, reference: str) -> tuple[str, str, str]:
    """A table row's train and validation loss (mean +- std, change against ``reference``)
    and its verdict ("yes"/"no" per split, "-" for the reference itself)."""
    parts = []
    for split in ("train", "val"):
        c = cell[split]
        change = "" if name == reference else f" ({100 * c[f'relative_to_{reference}']:+.1f} %)"
        parts.append(f"{_pm(c['mean'], c['std'], digits=4)}{change}")
    verdict = "-" if name == reference else "/".join(
        "yes" if cell[split][f"matches_{reference}"] else "no" for split in ("train", "val")
    )
    return parts[0], parts[1], verdict


def _changes(cells: dict[str, Any], reference: str) -> tuple[str, bool]:
    """"train / val" changes against ``reference`` and whether both are within the tolerance."""
    changes = " / ".join(f"{100 * cells[s][f'relative_to_{reference}']:+.1f} %" for s in ("train", "val"))
    return changes, all(cells[s][f"matches_{reference}"] for s in ("train", "val"))


def precision_reading(precision: dict[str, Any]) -> list[str]:
    """Per task: how far each bfloat16 variant ends from float32, against the tolerance."""
    lines = ["Pure bfloat16 training (train / validation loss against float32):"]
    for task, result in precision["tasks"].items():
        summary = result["summary"]
        parts = []
        for name in ("bfloat16, stochastic", "bfloat16, nearest"):
            changes, matched = _changes(summary[name], "float32")
            parts.append(f"{name.split(', ')[1]} rounding {changes} ({'within' if matched else 'outside'} the tolerance)")
        tolerance = " / ".join(f"{summary['bfloat16, stochastic'][s]['tolerance']:.4f}" for s in ("train", "val"))
        lines.append(f"  {_task_title(task, result)}: {'; '.join(parts)}; tolerance for stochastic rounding"
                     f" {tolerance} nats.")
    lines.append(
        "  Why: a bfloat16 value keeps 8 significant bits, so an update below half an ulp (2**-9 to 2**-8 of the value)"
        " is rounded away on every step by round-to-nearest and the parameter stalls; stochastic rounding"
        " rounds up with the probability of the dropped fraction, so the update survives on average."
    )
    if precision["setup"]["seeds"] < 2:
        lines.append("  (One seed: no seed-to-seed spread, so the tolerance is the 2 % alone.)")
    return lines


def _where(theta: float) -> str:
    """Which end of [-1, 1] a final mean θ counts as near."""
    if theta < -NEAR:
        return "near -1 (the optimum)"
    if theta > NEAR:
        return "near +1 (the wrong end)"
    return "in between"


def _paired_lag(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over seeds and its standard error (0 for a single seed)."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n)


def toy_reading(toy: dict[str, Any]) -> list[str]:
    """Where each optimizer ends, and whether and why the default clip makes ADOPT lag."""
    res = toy["optimizers"]
    steps = toy["setup"]["steps"]
    lines = [f"Toy problem (f(theta) = theta on [-1, 1]; 'near' means |mean theta| > {NEAR}):"]
    for name in TOY_OPTIMIZERS:
        groups: dict[str, list[str]] = {}
        for b in BETA2S:
            cell = res[name][str(b)]
            groups.setdefault(_where(cell["final_mean"]), []).append(f"{b} ({cell['final_mean']:+.2f})")
        parts = [f"{where} at beta2 = {', '.join(items)}" for where, items in groups.items()]
        lines.append(f"  {name}: " + "; ".join(parts) + ".")

    # "lags": ends above unclipped ADOPT by more than two standard errors of the paired gap
    lagging = []
    for b in BETA2S:
        gap, se = _paired_lag(res["ADOPT (default clip)"][str(b)]["final"], res["ADOPT (no clip)"][str(b)]["final"])
        if gap > 2 * se:
            lagging.append((b, gap))
    if toy["setup"]["seeds"] < 2:
        lines.append("  (One seed: the comparisons below have no error estimate.)")
    if steps < CLIP_CATCH_UP_STEP:
        lines.append(f"  This run stopped before step {CLIP_CATCH_UP_STEP}; use more --steps to see the clip catch up.")
    if not lagging:
        lines.append(
            "  ADOPT with the default clip does not end measurably above unclipped ADOPT at any beta2 in this run."
        )
        return lines
    lines.append(
        "  ADOPT with the default clip ends above (behind) unclipped ADOPT at beta2 = "
        + ", ".join(f"{b} (by {gap:.2f})" for b, gap in lagging)
        + "."
    )
    lines.append(
        f"  Why: the clip bounds the normalised gradient g/sqrt(v) at s**0.25. While v is near k**2 = {K * K}"
        f" (at the start, and for small beta2 after every frequent gradient -{K}), the rare gradient"
        f" normalises to about {K} and the frequent one to about -1. Clipped at s**0.25 < {K - 1}, the rare"
        f" push (1/{K}) * s**0.25 is smaller than the frequent pull ({K - 1}/{K}) * 1, so on average theta"
        f" is pushed toward +1, ever more weakly, until s > ({K}-1)**4 = {CLIP_CATCH_UP_STEP}. With larger"
        " beta2, v also averages in the rare g**2 = k**4, the rare gradient normalises to less than k, and"
        " the clip stops binding sooner."
    )
    turns = []
    for b, _ in lagging:
        cell = res["ADOPT (default clip)"][str(b)]
        if cell["turn_step"] < steps:
            turns.append(
                f"beta2 = {b}: mean theta rose to {cell['peak_mean']:+.2f}, stayed within {TURN_TOLERANCE}"
                f" of that until step {cell['turn_step']}, then fell to {cell['final_mean']:+.2f}"
            )
        else:
            turns.append(
                f"beta2 = {b}: mean theta was still near its highest ({cell['peak_mean']:+.2f}) at the last step"
            )
    lines.append("  Measured for ADOPT with the default clip: " + "; ".join(turns) + ".")
    return lines


def _unstable(curve: list[float]) -> bool:
    """The mean training loss gave back over half its progress, on a log scale, by the end."""
    return curve[-1] > math.sqrt(min(curve) * curve[0])


def digits_reading(digits: dict[str, Any]) -> list[str]:
    """Per setting: the accuracy gap against the seed spread, and any unstable training."""
    lines = ["Digits MLP:"]
    settings = list(digits["settings"])
    for s in settings:
        res = digits["results"][s]
        means = {n: 100 * r["test_accuracy_mean"] for n, r in res.items()}
        stds = {n: 100 * r["test_accuracy_std"] for n, r in res.items()}
        best, worst = max(means, key=means.__getitem__), min(means, key=means.__getitem__)
        gap = means[best] - means[worst]
        spread = max(stds[best], stds[worst])
        if digits["setup"]["seeds"] < 2:
            verdict = "one seed, so no seed-to-seed spread to compare with"
        else:
            verdict = f"{'within' if gap <= spread else 'larger than'} the seed-to-seed std ({spread:.2f})"
        text = ", ".join(f"{n} {_pm(means[n], stds[n])}" for n in res)
        lines.append(f"  {s}: {text} %. Best minus worst ({best} - {worst}) = {gap:.2f} points, {verdict}.")
        for n, r in res.items():
            curve = r["train_loss_mean"]
            if _unstable(curve):
                lines.append(
                    f"    {n} is unstable here: its mean training loss fell to {min(curve):.2e}"
                    f" and then rose to {curve[-1]:.2e}."
                )
    if len(settings) > 1:
        base, other = settings[0], settings[1]
        accuracy = {s: {n: r["test_accuracy_mean"] for n, r in digits["results"][s].items()} for s in (base, other)}
        drops = {n: 100 * (accuracy[other][n] - accuracy[base][n]) for n in accuracy[base]}
        lines.append(
            f"  Change from {base} to {other}: "
            + ", ".join(f"{n} {d:+.2f} points" for n, d in drops.items())
            + "."
        )
    return lines


# The full run's digits setting (epochs) in which Adam's instability at beta2 = 0.5 shows.
FULL_DIGITS_EPOCHS = 30


def run_limits(results: dict[str, Any]) -> list[str]:
    """What this run is too short to show, and why (empty for runs long enough)."""
    lines = []
    toy = results.get("toy")
    if toy is not None and toy["setup"]["steps"] < CLIP_CATCH_UP_STEP:
        lines.append(
            f"  Toy problem: ADOPT with the default clip cannot catch up within {toy['setup']['steps']} steps"
            f" (it needs more than ({K}-1)**4 = {CLIP_CATCH_UP_STEP}, see the reading below), so only"
            " unclipped ADOPT, the algorithm of the paper's theorem, is judged here."
            " Run without --quick (or with --steps 20000) to see the clip catch up."
        )
    digits = results.get("digits")
    if digits is not None and digits["setup"]["epochs"] < FULL_DIGITS_EPOCHS:
        settings = list(digits["settings"])
        unstable = [n for s in settings[1:] for n, r in digits["results"][s].items() if _unstable(r["train_loss_mean"])]
        if not unstable:
            lines.append(
                f"  Digits MLP: after {digits['setup']['epochs']} epochs no optimizer has become unstable at"
                f" {settings[-1]}; Adam's instability there shows later (in the full run's"
                f" {FULL_DIGITS_EPOCHS} epochs its training loss falls, then climbs back), so these rows"
                " compare early progress only."
            )
    return lines


def finding(results: dict[str, Any]) -> str:
    """The run's main finding in one line, from its numbers (the figure's title)."""
    parts = []
    toy = results.get("toy")
    if toy is not None:
        res = toy["optimizers"]
        wrong = [str(b) for b in BETA2S if res["Adam"][str(b)]["final_mean"] > NEAR]
        right = [str(b) for b in BETA2S if res["ADOPT (no clip)"][str(b)]["final_mean"] < -NEAR]
        parts.append(
            f"toy: Adam ends near the wrong end (+1) at β$_2$ = {', '.join(wrong) or 'none'}; "
            f"unclipped ADOPT near the optimum (−1) at β$_2$ = {', '.join(right) or 'none'}"
        )
    digits = results.get("digits")
    if digits is not None and len(digits["settings"]) > 1:
        base, other = list(digits["settings"])[:2]
        acc = {s: {n: r["test_accuracy_mean"] for n, r in digits["results"][s].items()} for s in (base, other)}
        change = ", ".join(f"{n} {100 * (acc[other][n] - acc[base][n]):+.1f}" for n in ("ADOPT", "Adam") if n in acc[base])
        parts.append(f"digits, {other.replace('beta2', 'β$_2$')} vs default: {change} points")
    precision = results.get("precision")
    if precision is not None:
        verdicts = []
        for task, result in precision["tasks"].items():
            summary = result["summary"]
            verdicts.append(
                f"{PRECISION_TASKS[task]} val loss {100 * summary['bfloat16, stochastic']['val']['relative_to_float32']:+.1f} %"
                f" (nearest {100 * summary['bfloat16, nearest']['val']['relative_to_float32']:+.1f} %)"
            )
        parts.append("pure bfloat16 with stochastic rounding vs float32: " + ", ".join(verdicts))
    state = results.get("state")
    if state is not None:
        verdicts = []
        for task, result in state["tasks"].items():
            summary = result["summary"]
            verdicts.append(
                f"{PRECISION_TASKS[task]} val loss {100 * summary['8bit']['val']['relative_to_full']:+.1f} %"
                f" (bf16 {100 * summary['bf16']['val']['relative_to_full']:+.1f} %,"
                f" 8-bit nearest {100 * summary['8bit, nearest']['val']['relative_to_full']:+.1f} %)"
            )
        parts.append("8-bit optimizer state vs full: " + ", ".join(verdicts))
    title = "\n".join(parts)
    if run_limits(results):
        title += "\n(a short run: what it cannot show is printed with the results)"
    return title


def save_figure(results: dict[str, Any], path: Path) -> None:
    """One row per experiment: θ over steps per β2; loss curves per setting and accuracies."""
    from matplotlib.figure import Figure

    rows: list[str] = [e for e in ("toy", "digits", "precision") if e in results]
    if "state" in results:
        rows += ["state", "state-relative", "state-toy"]
    fig = Figure(figsize=(17, 5.2 * len(rows)), layout="constrained")
    fig.suptitle(finding(results), fontsize=12)
    grid = fig.add_gridspec(len(rows), 12)
    for row, experiment in enumerate(rows):
        if experiment == "toy":
            _plot_toy(fig, grid, row, results["toy"])
        elif experiment == "digits":
            _plot_digits(fig, grid, row, results["digits"])
        elif experiment == "state":
            _plot_state(fig, grid, row, results["state"])
        elif experiment == "state-relative":
            _plot_state(fig, grid, row, results["state"], relative=True)
        elif experiment == "state-toy":
            _plot_state_toy(fig, grid, row, results["state"])
        else:
            _plot_precision(fig, grid, row, results["precision"])
    fig.savefig(path, dpi=110)


def _p10_p90(values: list[float]) -> tuple[float, float]:
    """The 10th and 90th percentiles (linear interpolation, as torch.quantile), the one spread
    measure every panel shows."""
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return at(0.1), at(0.9)


def _plot_toy(fig: Any, grid: Any, row: int, toy: dict[str, Any]) -> None:
    """One panel per β2: mean θ over steps per optimizer with a 10–90 % band over seeds."""
    steps = toy["steps"]
    setup = toy["setup"]
    axes: list[Any] = []
    for j, b in enumerate(BETA2S):
        ax = fig.add_subplot(grid[row, 3 * j : 3 * j + 3], sharey=axes[0] if axes else None)
        axes.append(ax)
        for name in TOY_OPTIMIZERS:
            cell = toy["optimizers"][name][str(b)]
            ax.plot(steps, cell["mean"], color=COLORS[name], ls=LINESTYLES.get(name, "-"), lw=1.6, label=name)
            ax.fill_between(steps, cell["p10"], cell["p90"], color=COLORS[name], alpha=0.15, lw=0)
        ax.axhline(-1, color="black", lw=0.8, ls=":")
        if setup["steps"] > CLIP_CATCH_UP_STEP:
            ax.axvline(CLIP_CATCH_UP_STEP, color="gray", lw=0.8, ls="--")
            ax.annotate(
                f"clip s$^{{1/4}}$ = k−1\nat s = {CLIP_CATCH_UP_STEP}",
                (CLIP_CATCH_UP_STEP, 0.5),
                xycoords=("data", "axes fraction"),
                ha="left", va="center", fontsize=8, color="dimgray", xytext=(3, 0), textcoords="offset points",
                bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1},
            )
        ax.set_title(f"toy problem ({setup['seeds']} seeds), β$_2$ = {b}")
        ax.set_xlabel("step")
        ax.set_ylim(-1.08, 1.08)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("θ (optimum −1)\nline: mean, band: 10–90 % of seeds")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)  # outside the data


def _plot_digits(fig: Any, grid: Any, row: int, digits: dict[str, Any]) -> None:
    """Training-loss curves per setting, then test accuracy per optimizer and setting."""
    from matplotlib.ticker import MaxNLocator

    setup = digits["setup"]
    settings = list(digits["settings"])
    epochs = list(range(setup["epochs"] + 1))
    for j, s in enumerate(settings):
        ax = fig.add_subplot(grid[row, 4 * j : 4 * j + 4])
        for name, r in digits["results"][s].items():
            per_seed = list(zip(*r["train_loss"]))  # [epochs + 1][seeds]
            ax.plot(epochs, r["train_loss_mean"], color=COLORS[name], ls=LINESTYLES.get(name, "-"), lw=1.6)
            bands = [_p10_p90(list(v)) for v in per_seed]
            ax.fill_between(epochs, [b[0] for b in bands], [b[1] for b in bands], color=COLORS[name], alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        beta2s = ", ".join(f"{n} {r['betas'][1]}" for n, r in digits["results"][s].items())
        ax.set_title(f"digits MLP ({setup['seeds']} seeds), β$_2$: {beta2s}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (line: mean, band: 10–90 % of seeds)")
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(grid[row, 4 * len(settings) :])
    names = list(digits["results"][settings[0]])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        for j, s in enumerate(settings):
            r = digits["results"][s][name]
            x = j + (i - (len(names) - 1) / 2) * width
            accs = [100 * a for a in r["test_accuracy"]]
            ax.scatter([x] * len(accs), accs, color=COLORS[name], s=10, alpha=0.5, lw=0)
            mean = 100 * r["test_accuracy_mean"]
            low, high = _p10_p90(accs)
            ax.errorbar(
                x, mean, yerr=[[mean - low], [high - mean]], fmt="o", color=COLORS[name],
                capsize=3, label=name if j == 0 else None,
            )
    ax.set_xticks(range(len(settings)), [s.replace("beta2", "β$_2$") for s in settings])
    ax.set_ylabel("test accuracy (%), dots: seeds")
    ax.set_title(f"digits test accuracy of {setup['seeds']} seeds (dot: mean, bar: 10–90 %)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside the data; same colours left


def _plot_precision(fig: Any, grid: Any, row: int, precision: dict[str, Any]) -> None:
    """Training and validation loss curves per task, one line per parameter precision."""
    from matplotlib.ticker import MaxNLocator

    seeds = precision["setup"]["seeds"]
    panels = [(task, split) for task in precision["tasks"] for split in ("train", "val")]
    width = 12 // len(panels)
    for j, (task, split) in enumerate(panels):
        result = precision["tasks"][task]
        ax = fig.add_subplot(grid[row, width * j : width * (j + 1)])
        for name, run in result["runs"].items():
            per_seed = run[f"{split}_loss"]  # [seeds][points]
            at = list(zip(*per_seed))
            mean = [sum(v) / len(v) for v in at]
            ls, lw = PRECISION_STYLES[name]
            ax.plot(run["steps"], mean, color=PRECISION_COLORS[name], ls=ls, lw=lw, label=name)
            ax.fill_between(run["steps"], [min(v) for v in at], [max(v) for v in at],
                            color=PRECISION_COLORS[name], alpha=0.15, lw=0)
        if task == "digits":  # the loss falls by orders of magnitude
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(result["setup"]["unit"])
        what = "training" if split == "train" else ("test" if task == "digits" else "validation")
        ax.set_ylabel(f"{what} loss (nats)")
        ax.set_title(f"{_task_title(task, result)}: {what}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              title=f"line: mean of {seeds} seeds\nband: min-max", title_fontsize=8)


STATE_COLORS = {"full": "black", "bf16": "tab:green", "8bit": "tab:cyan", "8bit, nearest": "tab:red"}
STATE_STYLES = {"full": ("-", 2.6), "bf16": ("-", 1.6), "8bit": ("--", 1.6), "8bit, nearest": ("-", 1.2)}
STATE_CONTROL = "8bit, nearest"
RELATIVE_BAND = 0.02  # the 2 % of the "matches full" criterion, shaded in the relative panels


def _bytes_cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (" (sim.)" if name == STATE_CONTROL else "")


def state_table(state: dict[str, Any]) -> str:
    """Final train and validation loss per task and state precision, with the change against
    full precision and the measured state bytes per parameter; then the toy problem."""
    setup = state["setup"]
    lines = [
        f"Optimizer state precision with ADOPT, float32 parameters: final loss (nats), mean +- std over"
        f" {setup['seeds']} seeds; in brackets the change against full; 'matches' = within max(2 %, 2 seed-std)"
        " of full",
        f"min_8bit_size={setup['min_8bit_size']}: every tensor's state in 8 bits, biases and norms included"
        " (the default 4096 would keep these small models' small tensors in full precision);"
        " '8bit, nearest' = 8-bit state with round-to-nearest, a control simulated on float32 state (sim.)",
        f"{'task':<34}{'state':<15}{'train loss':>28}{'validation loss':>28}  {'matches full':<14}{'state B/param':>14}",
    ]
    for task, result in state["tasks"].items():
        title = _task_title(task, result)
        for name, cell in result["summary"].items():
            *parts, verdict = _loss_cells(cell, name, "full")
            lines.append(f"{title:<34}{name:<15}{parts[0]:>28}{parts[1]:>28}  {verdict:<14}"
                         f"{_bytes_cell(name, cell.get('state_bytes_per_param')):>14}")
            title = ""
    toy = state["toy"]
    tsetup = toy["setup"]
    lines += [
        "",
        f"Toy problem, unclipped ADOPT: final theta after {tsetup['steps']} steps, mean +- std over"
        f" {tsetup['seeds']} seeds (optimum -1); in brackets minus full",
        f"{'state':<15}" + "".join(f"{'beta2=' + str(b):>26}" for b in BETA2S) + f"{'state B/param':>16}",
    ]
    for name, cells in toy["variants"].items():
        row = []
        for b in BETA2S:
            c = cells[str(b)]
            gap = "" if name == "full" else f" ({c['minus_full']:+.2f})"
            row.append(f"{_pm(c['final_mean'], c['final_std'], sign=True)}{gap}")
        lines.append(f"{name:<15}" + "".join(f"{r:>26}" for r in row)
                     + f"{_bytes_cell(name, cells.get('state_bytes_per_param')):>16}")
    return "\n".join(lines)


def state_reading(state: dict[str, Any]) -> list[str]:
    """Per task: how far each state precision ends from full, against the tolerance; the toy."""
    lines = ["Optimizer state precision (train / validation loss against full precision):"]
    for task, result in state["tasks"].items():
        summary = result["summary"]
        parts = []
        for name in summary:
            if name == "full":
                continue
            changes, matched = _changes(summary[name], "full")
            parts.append(f"{name} {changes} ({'within' if matched else 'outside'} the tolerance)")
        tolerance = " / ".join(f"{summary['8bit'][s]['tolerance']:.4f}" for s in ("train", "val"))
        lines.append(f"  {_task_title(task, result)}: {'; '.join(parts)}; tolerance for 8bit {tolerance} nats.")
    toy = state["toy"]
    near = {n: [str(b) for b in BETA2S if c[str(b)]["near_optimum"]] for n, c in toy["variants"].items()}
    toy_matched = {n: [str(b) for b in BETA2S if c[str(b)]["matches_full"]] for n, c in toy["variants"].items()}
    lines.append(
        f"  Toy problem ({toy['setup']['steps']} steps, clip off): near the optimum (mean theta <"
        f" {toy['setup']['near_optimum_below']}) at beta2 = "
        + "; ".join(f"{n}: {', '.join(b) or 'none'}" for n, b in near.items())
        + f". Within {toy['setup']['matches_full_within']} of full at beta2 = "
        + "; ".join(f"{n}: {', '.join(b) or 'none'}" for n, b in toy_matched.items() if n != "full")
        + "."
    )
    stalled = {n: [(b, c[str(b)]["v_stalled_fraction"]) for b in BETA2S if c[str(b)].get("v_stalled_fraction")]
               for n, c in toy["variants"].items()}
    lines.append(
        f"  Toy problem, seeds whose v never changed in the last {toy['setup']['steps'] - toy['setup']['steps'] // 2}"
        " steps: " + "; ".join(
            f"{n}: " + (", ".join(f"{100 * f:.0f} % at beta2 = {b}" for b, f in cells) or "none")
            for n, cells in stalled.items()
        ) + "."
    )
    lines.append(
        "  Why the control: an 8-bit code keeps 4 or 5 significant bits, so a moment that changes by less than"
        " half a code step per step (for large beta2, v moves by (1 - beta2) of itself) is rounded back to"
        " the same code by round-to-nearest and stops moving; ADOPT then divides by a stale v, which is a"
        " different algorithm even where it happens to descend faster. Stochastic rounding moves the code"
        " with the probability of the dropped fraction, so the stored v follows full precision's on average."
    )
    if state["setup"]["seeds"] < 2:
        lines.append("  (One seed: no seed-to-seed spread, so the tolerance is the 2 % alone.)")
    return lines


# Drawing order: the control underneath, full precision wide, the low-memory formats on top.
STATE_ORDER = ("8bit, nearest", "full", "bf16", "8bit")


def _plot_state(fig: Any, grid: Any, row: int, state: dict[str, Any], relative: bool = False) -> None:
    """Training and validation loss per task, one line per state precision; ``relative``:
    the mean loss's change against full precision's, in percent."""
    from matplotlib.ticker import MaxNLocator

    seeds = state["setup"]["seeds"]
    panels = [(task, split) for task in state["tasks"] for split in ("train", "val")]
    width = 12 // len(panels)
    for j, (task, split) in enumerate(panels):
        result = state["tasks"][task]
        ax = fig.add_subplot(grid[row, width * j : width * (j + 1)])
        runs = result["runs"]
        means = {name: [sum(v) / len(v) for v in zip(*run[f"{split}_loss"])] for name, run in runs.items()}
        for name in (n for n in STATE_ORDER if n in runs):
            run = runs[name]
            ls, lw = STATE_STYLES[name]
            if relative:
                ref = means["full"]
                ax.plot(run["steps"], [100 * (m / r - 1) for m, r in zip(means[name], ref)],
                        color=STATE_COLORS[name], ls=ls, lw=lw, label=name)
                continue
            at = list(zip(*run[f"{split}_loss"]))
            ax.plot(run["steps"], means[name], color=STATE_COLORS[name], ls=ls, lw=lw, label=name)
            ax.fill_between(run["steps"], [min(v) for v in at], [max(v) for v in at],
                            color=STATE_COLORS[name], alpha=0.10, lw=0)
        if task == "digits" and not relative:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(result["setup"]["unit"])
        what = "training" if split == "train" else ("test" if task == "digits" else "validation")
        if relative:
            ax.axhspan(-100 * RELATIVE_BAND, 100 * RELATIVE_BAND, color="gray", alpha=0.12, lw=0)
            ax.set_ylabel(f"mean {what} loss vs full (%)")
        else:
            ax.set_ylabel(f"{what} loss (nats)")
        ax.set_title(f"{_task_title(task, result)}\n{what} loss{', change vs full' if relative else ''}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    legend = f"state precision\nline: mean of {seeds} seeds\n" + ("band: ±2 %" if relative else "band: min-max")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), title=legend, title_fontsize=8)


def _plot_state_toy(fig: Any, grid: Any, row: int, state: dict[str, Any]) -> None:
    """The toy problem: mean theta over steps per state precision, one panel per beta2."""
    toy = state["toy"]
    axes: list[Any] = []
    for j, b in enumerate(BETA2S):
        ax = fig.add_subplot(grid[row, 3 * j : 3 * j + 3], sharey=axes[0] if axes else None)
        axes.append(ax)
        for name in (n for n in STATE_ORDER if n in toy["variants"]):
            cells = toy["variants"][name]
            ls, lw = STATE_STYLES[name]
            ax.plot(toy["steps"], cells[str(b)]["mean"], color=STATE_COLORS[name], ls=ls, lw=lw, label=name)
        ax.axhline(-1, color="black", lw=0.8, ls=":")
        ax.set_title(f"toy, ADOPT no clip, β$_2$ = {b} ({toy['setup']['seeds']} seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(-1.08, 0.3)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean θ (optimum −1)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="state precision",
                    title_fontsize=8)
