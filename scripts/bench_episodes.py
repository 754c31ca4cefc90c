"""What padding costs: variable-way, variable-shot episodes against fixed ones of the same mean size.

Variable episodes (``dataset.episodes=variable``, docs/episodes.md) are padded to one shape:
(max_support, ...) support rows and (max_ways * max_query, ...) query rows, whatever the
episode drew. This bench measures what that costs against fixed N-way K-shot episodes
holding, on average, as many real examples:

1. composes the variable config, loads the training split (Omniglot "background small" from
   the archives in ``--manual-dir``, prepared into ``--data-dir``; or, with ``--synthetic``
   only, a generated image folder), and samples ``--samples`` episode compositions
   (metalearn.episodes.episode_composition) on its class counts: mean ways W, mean support
   size S, mean queries per class Q, and the real-row fractions of the padded shape;
2. the fixed config of the same mean size: n_way = round(W), k_shot = round(S / W),
   k_query = round(Q) (Python's round: halves go to the even number);
3. runs the variable config twice (dataset.padding=exact, then masked) and the fixed one,
   each as a separate ``metalearn train`` process (same algorithm, model, meta-batch, steps
   and seed; no validation, no checkpoint before the end; blocks of steps per call
   as default), each measured by metalearn.reproduce.run_measured (its own VmHWM);
4. prints a table and the padding's cost in one sentence, appends one JSON line per config
   to ``--jsonl`` (default outputs/bench/bench.jsonl, the file of the other bench scripts),
   and with ``--out DIR`` writes a record folder (cmd.txt, table.md, bench.jsonl, the logs).

Columns: compile s is results.json's ``compile_time_s`` (the first compiled call, one step);
s/step is the median over the logged windows after it of seconds per step (bench_chain.py's
convention), so it excludes compilation; peak MiB is the process's resident high-water mark,
which on a CPU includes the dataset and the final test evaluation (run with eval.batch_size
= the meta-batch, so it stays below training's peak).

    python scripts/bench_episodes.py                                  # protonet, a few minutes on 2 cores
    python scripts/bench_episodes.py --algo maml --steps 40 --max-ways 10 --max-support 50
    python scripts/bench_episodes.py --out docs/runs/episodes_padding_cpu model.filters=32

Default bounds (smaller than Meta-Dataset's 5-50 ways, 500 support, 10 queries, for a 2-core
CPU): 5-20 ways, support <= 100, queries <= 5 per class. Extra ``key=value`` arguments go to
every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
SYNTHETIC_CLASSES = {"train": 40, "val": 10, "test": 10}


def write_synthetic_folder(folder: Path, per_class: int, size: int, seed: int = 0) -> None:
    """train/ val/ test/ class folders of ``per_class`` grayscale PNGs (size x size) each: a
    random 4x4 pattern per class under noise. Written once (a ``done`` marker)."""
    from PIL import Image

    if (folder / "done").is_file():
        return
    rng = np.random.default_rng(seed)
    for split, n_classes in SYNTHETIC_CLASSES.items():
        for c in range(n_classes):
            cell = size // 4 + 1
            pattern = np.kron(rng.uniform(0, 255, (4, 4)), np.ones((cell, cell)))[:size, :size]
            class_dir = folder / split / f"{split}{c:03d}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = np.clip(pattern + rng.normal(0, 48, pattern.shape), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(class_dir / f"{i:03d}.png")
    (folder / "done").write_text("complete\n")


def dataset_overrides(args: argparse.Namespace) -> list[str]:
    """The dataset keys every run shares: Omniglot small from the archives, or the synthetic
    folder (``--synthetic``)."""
    if args.synthetic:
        folder = args.data_dir / f"synthetic_{args.image_size}px_{args.per_class}"
        write_synthetic_folder(folder, args.per_class, args.image_size)
        return [
            "dataset=image_folder",
            f"dataset.path={folder}",
            f"dataset.data_dir={args.data_dir / 'cache'}",
            f"dataset.image_size={args.image_size}",
            "dataset.channels=1",
        ]
    return [
        "dataset=omniglot",
        "dataset.variant=small",
        f"dataset.manual_dir={args.manual_dir}",
        f"dataset.data_dir={args.data_dir / 'omniglot'}",
    ]


def compose(overrides: list[str]):
    """The validated config ``metalearn train <overrides>`` would run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from metalearn.cli import config_dir
    from metalearn.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def train_class_counts(cfg) -> np.ndarray:
    """Images per class of the training split, as variable episodes see it (classes with
    fewer than 2 images dropped; Omniglot's rotations are classes)."""
    from metalearn.episodes_source import flat_layout
    from metalearn.tasks import load_image_arrays

    arrays = load_image_arrays(cfg.dataset)
    layout, _ = flat_layout("train", arrays["train"], int(cfg.dataset.min_ways))
    return np.asarray(layout["counts"])


def mean_episode(counts: np.ndarray, bounds: dict[str, int], samples: int, seed: int = 0) -> dict[str, float]:
    """Mean composition of ``samples`` variable episodes over classes of ``counts`` images:
    ways, support size, queries per class, real rows, and the real fractions of the padded
    support (max_support rows) and query (max_ways * max_query rows) sets."""
    import jax
    import jax.numpy as jnp

    from metalearn.episodes import episode_composition

    keys = jax.random.split(jax.random.PRNGKey(seed), samples)
    counts_arr = jnp.asarray(counts, jnp.int32)
    _, _, ways, queries, shots = jax.jit(jax.vmap(lambda k: episode_composition(k, counts_arr, bounds)))(keys)
    ways, queries = np.asarray(ways, np.float64), np.asarray(queries, np.float64)
    support = np.asarray(shots).sum(axis=1).astype(np.float64)
    query_rows = ways * queries
    padded_query = bounds["max_ways"] * bounds["max_query"]
    return {
        "samples": samples,
        "mean_ways": float(ways.mean()),
        "mean_support": float(support.mean()),
        "mean_queries_per_class": float(queries.mean()),
        "mean_query_rows": float(query_rows.mean()),
        "support_real_fraction": float(support.mean() / bounds["max_support"]),
        "query_real_fraction": float(query_rows.mean() / padded_query),
    }


def fixed_of(mean: dict[str, float]) -> dict[str, int]:
    """The fixed episode of the same mean size: n_way, k_shot (support per way), k_query."""
    n_way = max(1, round(mean["mean_ways"]))
    k_shot = max(1, round(mean["mean_support"] / mean["mean_ways"]))
    return {"n_way": n_way, "k_shot": k_shot, "k_query": max(1, round(mean["mean_queries_per_class"]))}


def run_row(name: str, command: list[str], run_dir: Path, log: Path) -> dict:
    """Run one ``metalearn train`` and read its cost: compile s, s/step, wall s, peak MiB."""
    from metalearn.reproduce import run_measured

    code, wall, peak = run_measured(command, log)
    if code != 0:
        raise RuntimeError(f"the {name} run failed (exit {code}); its log: {log}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in records if r.get("split") == "train" and r.get("steps_per_s")]
    rates = [r for r in rates if np.isfinite(r) and r > 0]  # the first log can be the compiled step
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "steps": results["steps"],
        "seconds_per_step": 1.0 / statistics.median(rates) if rates else None,
        "timed_windows": len(rates),
        "compile_s": results.get("compile_time_s"),
        "train_s": results.get("train_time_s"),
        "wall_s": wall,
        "peak_rss_mib": peak,
        "test_accuracy": results["test"]["mean"],
    }


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| episodes | shape (support + query rows) | mean real rows | s/step | compile s | peak MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        per_step = "-" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}"
        lines.append(
            f"| {r['episode_desc']} | {r['support_rows']} + {r['query_rows']} | "
            f"{r['real_support_rows']:.1f} + {r['real_query_rows']:.1f} | {per_step} | "
            f"{r['compile_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def padding_sentence(rows: list[dict]) -> str:
    """What the padding costs, from the rows: each variable row against the fixed one."""
    by_config = {r["config"]: r for r in rows}
    fixed = by_config["fixed"]

    def cost(variable: dict) -> str:
        time_part = ""
        if variable["seconds_per_step"] and fixed["seconds_per_step"]:
            time_part = f"{variable['seconds_per_step'] / fixed['seconds_per_step']:.2f}x the time per step, "
        return (
            f"{time_part}{variable['compile_s'] / fixed['compile_s']:.2f}x the compile time and "
            f"{variable['peak_rss_mib'] - fixed['peak_rss_mib']:+.0f} MiB of peak memory"
        )

    exact, masked = by_config["variable"], by_config["variable_masked"]
    return (
        f"Against {fixed['episode_desc']} episodes of the same mean size, padding costs "
        f"{cost(exact)} with dataset.padding=exact (row chunks: padding changes no bit), and "
        f"{cost(masked)} with dataset.padding=masked (masks alone: the same numbers to float64 "
        f"rounding); real rows fill {exact['support_real_fraction']:.0%} of the padded support "
        f"and {exact['query_real_fraction']:.0%} of the padded query set."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--algo", default="protonet")
    parser.add_argument("--min-ways", type=int, default=5)
    parser.add_argument("--max-ways", type=int, default=20)
    parser.add_argument("--max-support", type=int, default=100)
    parser.add_argument("--max-query", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="meta-steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="the timed windows' length")
    parser.add_argument("--meta-batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tasks", type=int, default=10, help="eval.n_tasks of the final test")
    parser.add_argument("--samples", type=int, default=4000, help="episode compositions sampled")
    parser.add_argument("--manual-dir", type=Path, default=SHARED_OMNIGLOT, help="the Omniglot archives")
    parser.add_argument("--data-dir", type=Path, default=Path("outputs/bench/episodes_data"))
    parser.add_argument(
        "--synthetic", action="store_true", help="a generated image folder instead of Omniglot"
    )
    parser.add_argument("--image-size", type=int, default=28, help="--synthetic only")
    parser.add_argument("--per-class", type=int, default=20, help="--synthetic only: images per class")
    parser.add_argument("--work", type=Path, default=None, help="the runs' folder (default: timestamped)")
    parser.add_argument("--jsonl", type=Path, default=Path("outputs/bench/bench.jsonl"))
    parser.add_argument("--out", type=Path, default=None, help="a record folder to write")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    for key in (
        "min_ways",
        "max_ways",
        "max_support",
        "max_query",
        "steps",
        "log_every",
        "meta_batch",
        "samples",
    ):
        if getattr(args, key) < 1:
            refuse(f"invalid --{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    if not args.synthetic and not args.manual_dir.is_dir():
        refuse(
            f"invalid --manual-dir={args.manual_dir}: no such folder (the Omniglot archives; or --synthetic)"
        )
    return args


def refuse(message: str) -> None:
    """Bad input: one line on stderr, exit 2."""
    print(f"bench_episodes: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    from metalearn.config import composition_error
    from metalearn.errors import MetalearnError

    try:
        return bench(parse_args(argv), argv)
    except MetalearnError as err:
        print(f"bench_episodes: {err}", file=sys.stderr)
    except RuntimeError as err:  # a run failed: its log says why
        print(f"bench_episodes: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # Hydra's composition errors are several lines
        if type(err).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"bench_episodes: {composition_error(err)}", file=sys.stderr)
    return 2


def bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The bench of ``args`` (see the module docstring); 0 when every run finished."""
    bounds = {
        "min_ways": args.min_ways,
        "max_ways": args.max_ways,
        "max_support": args.max_support,
        "max_query": args.max_query,
    }
    data = dataset_overrides(args)
    shared = [
        f"algo={args.algo}",
        *data,
        "dataset.placement=device",
        "dataset.n_way_train=null",  # some algo x dataset presets train wider than they test
        f"trainer.steps={args.steps}",
        f"trainer.log_every={args.log_every}",
        f"trainer.meta_batch_size={args.meta_batch}",
        "trainer.val_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress=false",
        f"eval.n_tasks={args.eval_tasks}",
        f"eval.batch_size={args.meta_batch}",
        f"seed={args.seed}",
        *args.overrides,
    ]
    variable = ["dataset.episodes=variable", *(f"dataset.{k}={v}" for k, v in bounds.items())]
    variable_masked = [*variable, "dataset.padding=masked"]
    variable = [*variable, "dataset.padding=exact"]
    cfg = compose([*shared, *variable])
    counts = train_class_counts(cfg)
    mean = mean_episode(counts, bounds, args.samples, args.seed)
    fixed = fixed_of(mean)
    fixed_keys = ["dataset.episodes=fixed", *(f"dataset.{k}={v}" for k, v in fixed.items())]
    compose([*shared, *fixed_keys])  # a bad override fails here, before either run
    print(
        f"variable episodes {bounds} on {len(counts)} training classes ({args.samples} sampled): "
        f"mean {mean['mean_ways']:.2f} ways, {mean['mean_support']:.1f} support, "
        f"{mean['mean_queries_per_class']:.2f} queries per class -> fixed {fixed}",
        flush=True,
    )

    work = args.work or Path("outputs/bench/episodes") / time.strftime("%Y-%m-%d_%H-%M-%S")
    padded_query = args.max_ways * args.max_query
    exact = {
        "keys": variable,
        "episode": bounds,
        "episode_desc": f"variable {args.min_ways}-{args.max_ways} ways, "
        f"<= {args.max_support} support, <= {args.max_query} queries",
        "support_rows": args.max_support,
        "query_rows": padded_query,
        "real_support_rows": mean["mean_support"],
        "real_query_rows": mean["mean_query_rows"],
        "support_real_fraction": mean["support_real_fraction"],
        "query_real_fraction": mean["query_real_fraction"],
    }
    masked = {**exact, "keys": variable_masked, "episode_desc": exact["episode_desc"] + ", masked"}
    configs = {
        "variable": exact,
        "variable_masked": masked,
        "fixed": {
            "keys": fixed_keys,
            "episode": fixed,
            "episode_desc": f"fixed {fixed['n_way']}-way {fixed['k_shot']}-shot {fixed['k_query']} queries",
            "support_rows": fixed["n_way"] * fixed["k_shot"],
            "query_rows": fixed["n_way"] * fixed["k_query"],
            "real_support_rows": float(fixed["n_way"] * fixed["k_shot"]),
            "real_query_rows": float(fixed["n_way"] * fixed["k_query"]),
            "support_real_fraction": 1.0,
            "query_real_fraction": 1.0,
        },
    }
    rows = []
    for name, spec in configs.items():
        run_dir = work / name
        train = [sys.executable, "-m", "metalearn.cli", "train"]
        command = [*train, *shared, *spec["keys"], f"hydra.run.dir={run_dir}"]
        print(f"{name}: metalearn train {shlex.join(command[4:])}", flush=True)
        measured = run_row(name, command, run_dir, work / f"{name}.log")
        rows.append(
            {
                "kind": "episodes",
                "config": name,
                "algo": args.algo,
                "dataset": "synthetic" if args.synthetic else "omniglot_small",
                "meta_batch": args.meta_batch,
                "seed": args.seed,
                "overrides": args.overrides,
                **{k: v for k, v in spec.items() if k != "keys"},
                "mean_episode": mean,
                **measured,
                "machine": platform.machine(),
                "processor": platform.processor() or platform.machine(),
                "host": platform.node(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
    markdown = table(rows)
    sentence = padding_sentence(rows)
    print(f"\n{markdown}\n\n{sentence}")
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    with args.jsonl.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"appended {len(rows)} rows to {args.jsonl}")
    if args.out is not None:
        write_record(args.out, argv, rows, markdown, sentence, work)
        print(f"record in {args.out}")
    return 0


def write_record(
    out: Path, argv: list[str] | None, rows: list[dict], markdown: str, sentence: str, work: Path
) -> None:
    """cmd.txt (the command), table.md, bench.jsonl and the runs' logs in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    words = sys.argv[1:] if argv is None else argv
    (out / "cmd.txt").write_text(f"python scripts/bench_episodes.py {shlex.join(words)}\n")
    (out / "table.md").write_text(f"{markdown}\n\n{sentence}\n")
    (out / "bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for row in rows:
        log = work / f"{row['config']}.log"
        if log.is_file():
            (out / log.name).write_text(log.read_text())


if __name__ == "__main__":
    sys.exit(main())
