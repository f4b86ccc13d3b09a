"""Training curves read from runs' TensorBoard event files, drawn as PNGs (matplotlib, Agg).

One figure per group of scalars, every run overlaid: the loss parts (``loss/*``), the learning rate
(``optim/lr``), and the held-out metrics of evaluation during training (``eval/*``: held-out loss,
KL to the teacher, top-1 agreement). A group no run logged is not drawn.
"""

from __future__ import annotations

from pathlib import Path

from dist_distill.errors import UserError

GROUPS = {
    "loss": ("training loss parts (per target token)", ("loss/loss", "loss/divergence", "loss/ce")),
    "lr": ("learning rate", ("optim/lr",)),
    "eval_loss": ("held-out loss (nats / target token)", ("eval/heldout_loss",)),
    "eval_teacher": ("KL to the teacher (nats / token) and top-1 agreement",
                     ("eval/kl_teacher", "eval/top1_agreement", "eval/train_kl_teacher", "eval/train_top1_agreement")),
}
"""file stem -> (title, TensorBoard tags)."""


def read_scalars(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """tag -> (steps, values) of every scalar in the event files under `run_dir` (its tensorboard/ folder
    or the folder itself), via tensorboard's EventAccumulator; a step logged twice (a resumed run) keeps
    the last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(run_dir)
    folder = run_dir / "tensorboard" if (run_dir / "tensorboard").is_dir() else run_dir
    if not any(folder.glob("events.out.tfevents.*")):
        raise UserError(f"{folder}: no TensorBoard event files (events.out.tfevents.*); is it a dd-train output.dir?")
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = sorted(by_step)
        out[tag] = (steps, [by_step[s] for s in steps])
    return out


def plot_runs(runs: dict[str, str | Path], out_dir: str | Path) -> list[Path]:
    """Draw the GROUPS of every run in `runs` (label -> run directory) into `out_dir`/<group>.png; returns
    the files written, in GROUPS order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = {label: read_scalars(d) for label, d in runs.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, tags) in GROUPS.items():
        present = [(label, tag) for label in scalars for tag in tags if tag in scalars[label]]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        second = None
        for i, (label, tag) in enumerate(present):
            steps, values = scalars[label][tag]
            axis = ax
            if tag.endswith("top1_agreement"):  # a fraction next to nats: its own axis
                second = second or ax.twinx()
                axis = second
                second.set_ylabel("top-1 agreement")
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, color=f"C{i % 10}",
                      linestyle="--" if axis is second else "-", label=f"{label}: {tag.split('/')[-1]}")
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        if stem == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        handles, labels = ax.get_legend_handles_labels()
        if second is not None:
            h2, l2 = second.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
