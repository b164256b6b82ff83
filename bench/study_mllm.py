"""The MLLM study: MokA, LoRA and MokA with lambda 0 in MokA's native setting (image tokens and question tokens in
one decoder), on easy-VQA, over seeds.

    python bench/study_mllm.py                                    # every run, then the table and the plot
    python bench/study_mllm.py --seeds 42 --runs moka lora        # a subset (the table covers what exists)

Every run is `mora_jax.train.loop.train` with configs/easy_vqa_mllm_<run>.py (the embedded CLIP vision tower and
the embedded LM, both frozen; 70% missing of type both in training; exact match per scenario and question
type). A run whose workdir already holds eval.json is reused, so an interrupted study resumes. Writes
docs/study_mllm.{json,md,png}.

Superseded by `python -m mora_jax.reproduce easy-vqa-mllm` (the same runs, and more rows; runs in
<workdir>/easy_vqa/mllm-*/seed<seed>, not this script's folders); nothing in mora_jax imports this script.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from mora_jax import data
from mora_jax.train import config as config_lib
from mora_jax.reproduce.tables import EASY_VQA_QUESTION_TYPES as QUESTION_TYPES
from mora_jax.reproduce.tables import EASY_VQA_SCENARIOS as SCENARIO_NAMES
from mora_jax.train import answering, job, loop, recipes

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"moka": "MokA", "lora": "LoRA", "moka_lambda0": "MokA, lambda 0"}
# Yes/no exact match of every two-tower method, with or without the image (docs/easy-vqa.md): late fusion's
# ceiling, drawn in the plot.
LATE_FUSION_YES_NO_CEILING = 0.825


def run(name: str, seed: int, args) -> dict:
  workdir = Path(args.workdir) / f"{name}-seed{seed}"
  if not (workdir / job.EVAL_FILE).is_file():
    config = recipes.mllm(name)
    values = {"seed": seed, "data_dir": args.data_dir, "lm.cache_dir": args.cache_dir,
              "backbone.cache_dir": args.cache_dir}
    if args.smoke:
      values.update({"max_steps": 2, "stage1.steps": 2, "eval.validation_samples": 32, "eval.test_samples": 32})
    config_lib.apply_overrides(config, [(k, str(v)) for k, v in values.items()])
    print(f"--- {RUNS[name]}, seed {seed}: {workdir}", flush=True)
    start = time.perf_counter()
    loop.train(config, workdir)
    (workdir / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
  results = json.loads((workdir / job.EVAL_FILE).read_text())
  return {"name": RUNS[name], "seed": seed, "test": results["test"], "parameters": results["parameters"],
          "train_seconds": results["train_seconds"],
          "wall_seconds": float((workdir / "wall_seconds.txt").read_text())
          if (workdir / "wall_seconds.txt").is_file() else None}


def mean_std(values: list[float]) -> str:
  mean = 100 * statistics.fmean(values)
  return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def summarise(records: list[dict]) -> dict[str, dict]:
  by_name: dict[str, list[dict]] = {}
  for r in records:
    by_name.setdefault(r["name"], []).append(r)
  return {name: {"seeds": [r["seed"] for r in runs], "adapter_parameters": runs[0]["parameters"]["adapter"],
                 "exact_match": {s: [r["test"][s][answering.METRIC] for r in runs] for s in data.SCENARIOS},
                 "by_question_type": {s: {q: [r["test"][s]["per_question_type"][q] for r in runs]
                                          for q in QUESTION_TYPES} for s in data.SCENARIOS}}
          for name, runs in by_name.items()}


def tables(summary: dict[str, dict]) -> str:
  lines = ["Exact match of the generated answer (%), test split (9,673 questions), mean ± std over seeds:", "",
           "| method | adapter params | " + " | ".join(SCENARIO_NAMES.values()) + " | seeds |",
           "|---|---:|" + "---:|" * len(SCENARIO_NAMES) + "---|"]
  for name, s in summary.items():
    lines.append(f"| {name} | {s['adapter_parameters']:,} | "
                 + " | ".join(mean_std(s["exact_match"][k]) for k in SCENARIO_NAMES) + f" | {len(s['seeds'])} |")
  lines += ["", "Per question type (complete / image missing / mix):", "",
            "| method | " + " | ".join(f"{q} {s}" for q in QUESTION_TYPES for s in ("complete", "image missing", "mix"))
            + " |", "|---|" + "---:|" * (3 * len(QUESTION_TYPES))]
  for name, s in summary.items():
    cells = [mean_std(s["by_question_type"][scenario][q]) for q in QUESTION_TYPES
             for scenario in ("complete", "image_missing", "mix")]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  most_seeds = max(len(s["seeds"]) for s in summary.values())
  lines += ["", "Per seed, complete scenario (exact match / colour questions), where the spread comes from:", "",
            "| method | " + " | ".join(f"run {k + 1}" for k in range(most_seeds)) + " |",
            "|---|" + "---:|" * most_seeds]
  for name, s in summary.items():
    cells = [f"seed {seed}: {100 * em:.1f} / {100 * colour:.1f}" for seed, em, colour in
             zip(s["seeds"], s["exact_match"]["complete"], s["by_question_type"]["complete"]["color"])]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict], path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(summary)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  width = 0.8 / len(names)
  groups = [("exact match per scenario", list(SCENARIO_NAMES), lambda s, k: s["exact_match"][k],
             list(SCENARIO_NAMES.values())),
            ("complete, per question type", list(QUESTION_TYPES), lambda s, q: s["by_question_type"]["complete"][q],
             list(QUESTION_TYPES))]
  for ax, (title, keys, values_of, labels) in zip(axes, groups):
    for i, name in enumerate(names):
      values = [values_of(summary[name], k) for k in keys]
      means = [100 * statistics.fmean(v) for v in values]
      errors = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
      positions = [k + (i - (len(names) - 1) / 2) * width for k in range(len(keys))]
      ax.bar(positions, means, width, yerr=errors, capsize=2, label=name)
      # The seeds themselves: with three of them a mean ± std hides a bimodal spread.
      ax.scatter([x for x, v in zip(positions, values) for _ in v], [100 * u for v in values for u in v], s=8,
                 color="black", zorder=3)
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("exact match (%)")
    ax.set_title(title)
  axes[1].axhline(100 * LATE_FUSION_YES_NO_CEILING, color="gray", linestyle="--", linewidth=1,
                  label="two-tower yes/no ceiling (82.5%)")
  axes[1].legend(fontsize=8)
  fig.suptitle("easy-VQA, embedded CLIP vision tower + embedded LM (frozen), 70% missing (both); "
               "mean ± std, dots: seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="RUN")
  parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44],
                      help="42 is the configs' own seed: `train.py --config configs/easy_vqa_mllm_<run>.py` is a run")
  parser.add_argument("--workdir", default=None, help="default: runs/study_mllm (runs/study_mllm_smoke with --smoke)")
  parser.add_argument("--data_dir", default="data")
  parser.add_argument("--cache_dir", default="~/.cache/mora_jax")
  parser.add_argument("--smoke", action="store_true", help="2 steps per stage, 32 test samples: checks the script")
  parser.add_argument("--out", default=None, help="default: docs/ (the workdir with --smoke, so docs/ keeps the study)")
  args = parser.parse_args()
  # A smoke run neither reuses the study's runs nor overwrites its tables.
  args.workdir = args.workdir or ("runs/study_mllm_smoke" if args.smoke else "runs/study_mllm")
  args.out = args.out or (args.workdir if args.smoke else str(ROOT / "docs"))
  records = [run(name, seed, args) for seed in args.seeds for name in args.runs]
  summary = summarise(records)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "study_mllm.json").write_text(json.dumps({"runs": records, "summary": summary}, indent=2) + "\n")
  text = tables(summary)
  (out / "study_mllm.md").write_text(text)
  plot(summary, out / "study_mllm.png")
  print(text)


if __name__ == "__main__":
  main()
