"""The easy-VQA study: MoRA's two findings reproduced at small scale on the embedded pre-trained CLIP.

    python bench/study_easyvqa.py                                  # every run, then the tables and the plot
    python bench/study_easyvqa.py --seeds 0 --runs MoRA LoRA       # a subset, added to the existing tables

1. Aligned vs unaligned towers: LoRA and MoRA on the pre-trained backbone vs on a "mismatched" one whose vision
   tower and text tower come from two independent pre-training runs (seeds 0 and 1, `embedded.combine_towers`).
2. Methods on the aligned backbone: linear probe, LoRA, DoRA, MoRA (+ identity_start, + the MLP head), MokA
   (two-tower) (+ lambda 0, its cross term off; + a lower learning rate), and the prompt baselines MMP and DCP
   (docs/prompts.md), each with several fine-tuning seeds (adapter and head init, data order, dropout).

Every run is the library's own `loop.train` with the easy-VQA recipe (70% missing of type both in training,
test per scenario and per question type); a run whose workdir already holds eval.json is reused, so an
interrupted study resumes. Writes docs/study_easyvqa.{json,md,png}; the runs already recorded there that this
command did not ask for are kept, so a subset adds (or replaces) its rows.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from mora_jax import data
from mora_jax.backbones import embedded
from mora_jax.train import config as config_lib
from mora_jax.train import job, loop, recipes

ROOT = Path(__file__).resolve().parents[1]
# name -> (method, config overrides, backbone: "aligned" or "mismatched")
RUNS = {
    "MoRA": ("mora", {}, "aligned"),
    "MokA (two-tower)": ("moka", {}, "aligned"),
    # Without the cross term MokA is per-tower LoRA at MokA's alpha (16, LoRA's is PEFT's 8): separates the two.
    "MokA, lambda 0": ("moka", {"adapter.lam": 0.0}, "aligned"),
    # The recipe's lr (1e-2) was set for MoRA; MokA's scale is twice LoRA's.
    "MokA (two-tower), lr 3e-3": ("moka", {"optim.lr": 3e-3}, "aligned"),
    "LoRA": ("lora", {}, "aligned"),
    "LoRA, mismatched towers": ("lora", {}, "mismatched"),
    "MoRA, mismatched towers": ("mora", {}, "mismatched"),
    "linear probe": ("linear", {}, "aligned"),
    "DoRA": ("dora", {}, "aligned"),
    "MoRA (identity_start)": ("mora", {"adapter.variant": "identity_start"}, "aligned"),
    "MoRA + MLP head": ("mora", {"head.type": "mlp"}, "aligned"),
    # The prompt baselines with the study's run settings (recipes.PUBLISHED["easy_vqa"]["prompting"]).
    "MMP": ("mmp", {}, "aligned"),
    "DCP": ("dcp", {}, "aligned"),
}
SCENARIO_NAMES = {"complete": "complete", "text_missing": "text missing", "image_missing": "image missing",
                  "mix": "mix (70% both)"}
QUESTION_TYPES = ("yes/no", "color", "shape")


def slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def backbone(kind: str, cache_dir: Path, data_dir: str) -> Path:
  """The aligned (embedded, seed 0) or mismatched (vision of seed 0, text of seed 1) backbone, built on demand."""
  aligned = embedded.ensure(cache_dir, data_dir, seed=0)
  if kind == "aligned":
    return aligned
  mismatched = cache_dir / f"easy_vqa_clip-v{embedded.VERSION}-vision-seed0-text-seed1"
  if not (mismatched / "towers.json").is_file():
    embedded.combine_towers(aligned, embedded.ensure(cache_dir, data_dir, seed=1), mismatched)
  return mismatched


def run(name: str, seed: int, args) -> dict:
  method, overrides, kind = RUNS[name]
  workdir = Path(args.workdir) / f"{slug(name)}-seed{seed}"
  if not (workdir / job.EVAL_FILE).is_file():
    config = recipes.get("easy_vqa", method)
    path = backbone(kind, Path(args.cache_dir).expanduser(), args.data_dir)
    values = {"seed": seed, "backbone.path": str(path), "data_dir": args.data_dir, **overrides}
    if args.max_steps:
      values["max_steps"] = args.max_steps
    config_lib.apply_overrides(config, [(k, str(v)) for k, v in values.items()])
    print(f"--- {name}, seed {seed}: {workdir}", flush=True)
    start = time.perf_counter()
    loop.train(config, workdir)
    (workdir / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
  results = json.loads((workdir / job.EVAL_FILE).read_text())
  config = json.loads((workdir / job.CONFIG_FILE).read_text())
  train_records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # Loop throughput (train step + input pipeline), median over the logged windows after the first (compile).
  rates = [r["samples_per_s"] for r in train_records if r["kind"] == "train"][1:]
  return {"name": name, "seed": seed, "test": results["test"], "merged": results["merged"],
          "trainable_parameters": results["parameters"]["trainable"],
          "ms_per_step": 1000 * config["batch_size"] / statistics.median(rates) if rates else None,
          "wall_seconds": float((workdir / "wall_seconds.txt").read_text())}


def with_recorded(records: list[dict], path: Path) -> list[dict]:
  """`records` plus the runs of an earlier study file at `path` that they do not redo, in RUNS order, then by
  seed."""
  done = {(r["name"], r["seed"]) for r in records}
  earlier = json.loads(path.read_text())["runs"] if path.is_file() else []
  merged = records + [r for r in earlier if (r["name"], r["seed"]) not in done and r["name"] in RUNS]
  order = list(RUNS)
  return sorted(merged, key=lambda r: (order.index(r["name"]), r["seed"]))


def mean_std(values: list[float]) -> str:
  mean = 100 * statistics.fmean(values)
  return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def summarise(records: list[dict]) -> dict[str, dict]:
  by_name: dict[str, list[dict]] = {}
  for r in records:
    by_name.setdefault(r["name"], []).append(r)
  summary = {}
  for name, runs in by_name.items():
    cell = lambda scenario, key="accuracy": [r["test"][scenario][key] for r in runs]  # noqa: E731
    summary[name] = {
        "seeds": [r["seed"] for r in runs],
        "trainable_parameters": runs[0]["trainable_parameters"],
        "ms_per_step": statistics.median([r["ms_per_step"] for r in runs]),
        "accuracy": {s: cell(s) for s in data.SCENARIOS},
        "by_question_type": {s: {q: cell(s, f"accuracy_{q}") for q in QUESTION_TYPES} for s in data.SCENARIOS},
    }
  return summary


def tables(summary: dict[str, dict]) -> str:
  lines = ["| method | trainable params | ms/step | " + " | ".join(SCENARIO_NAMES.values()) + " | seeds |",
           "|---|---:|---:|" + "---:|" * len(SCENARIO_NAMES) + "---|"]
  for name, s in summary.items():
    lines.append(f"| {name} | {s['trainable_parameters']:,} | {s['ms_per_step']:.1f} | "
                 + " | ".join(mean_std(s["accuracy"][k]) for k in SCENARIO_NAMES) + f" | {len(s['seeds'])} |")
  lines += ["", "Accuracy per question type (complete / mix):", "",
            "| method | " + " | ".join(f"{q} complete | {q} mix" for q in QUESTION_TYPES) + " |",
            "|---|" + "---:|" * (2 * len(QUESTION_TYPES))]
  for name, s in summary.items():
    q_cells = [mean_std(s["by_question_type"][scenario][q]) for q in QUESTION_TYPES for scenario in ("complete", "mix")]
    lines.append(f"| {name} | " + " | ".join(q_cells) + " |")
  pairs = [(n, f"{n}, mismatched towers") for n in ("LoRA", "MoRA") if {n, f"{n}, mismatched towers"} <= set(summary)]
  if pairs:
    lines += ["", "Aligned vs mismatched towers: drop from complete, in accuracy points:", "",
              "| method, backbone | complete | text missing | image missing | mix | drop text missing | drop image missing |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name in (n for pair in pairs for n in pair):
      acc = {k: statistics.fmean(v) for k, v in summary[name]["accuracy"].items()}
      lines.append(f"| {name} | " + " | ".join(f"{100 * acc[k]:.1f}" for k in SCENARIO_NAMES)
                   + f" | {100 * (acc['complete'] - acc['text_missing']):.1f}"
                   + f" | {100 * (acc['complete'] - acc['image_missing']):.1f} |")
  return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(summary)
  fig, ax = plt.subplots(figsize=(11, 4.5))
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    values = [summary[name]["accuracy"][k] for k in SCENARIO_NAMES]
    means = [100 * statistics.fmean(v) for v in values]
    errors = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    ax.bar([k + (i - (len(names) - 1) / 2) * width for k in range(len(SCENARIO_NAMES))], means, width,
           yerr=errors, capsize=2, label=name)
  ax.set_xticks(range(len(SCENARIO_NAMES)), list(SCENARIO_NAMES.values()))
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title("easy-VQA, embedded pre-trained CLIP, trained with 70% missing (both); mean ± std over seeds")
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="RUN")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--workdir", default="runs/study_easyvqa")
  parser.add_argument("--data_dir", default="data")
  parser.add_argument("--cache_dir", default="~/.cache/mora_jax")
  parser.add_argument("--max_steps", type=int, default=0, help="> 0: shorter runs (smoke test of the script)")
  parser.add_argument("--out", default=str(ROOT / "docs"))
  args = parser.parse_args()
  # Seed-major: every run of the first seed before any second seed, so a partial study covers every method.
  records = [run(name, seed, args) for seed in args.seeds for name in args.runs]
  out = Path(args.out)
  records = with_recorded(records, out / "study_easyvqa.json")
  summary = summarise(records)
  out.mkdir(parents=True, exist_ok=True)
  cache = Path(args.cache_dir).expanduser()
  pretraining = {p.name: json.loads((p / "pretraining.json").read_text())
                 for p in sorted(cache.glob("easy_vqa_clip-*")) if (p / "pretraining.json").is_file()}
  (out / "study_easyvqa.json").write_text(json.dumps(
      {"runs": records, "summary": summary, "pretraining": pretraining}, indent=2) + "\n")
  text = tables(summary)
  (out / "study_easyvqa.md").write_text(text)
  plot(summary, out / "study_easyvqa.png")
  print(text)


if __name__ == "__main__":
  main()
