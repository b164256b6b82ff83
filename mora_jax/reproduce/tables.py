"""The papers' tables as data: which runs each cell needs, what it reads from them, and the published number.

A `Training` is one train.py run without its seed: a dataset's recipe (mora_jax.train.recipes.get) for a method, or
for task "mllm" the easy-VQA multimodal-LLM recipe (mora_jax.train.recipes.mllm), the missing type and rate it
trains (and tests) with, and config overrides. A `Measure` is what a cell reads from
one training of one seed: a scenario's metric of its own test (eval.json), or of a re-test at another missing
type and rate (eval.py's). A `Cell` averages its measures per seed (the MoRA paper's per-rate numbers are the
mean over the three missing types), then reports mean ± std over seeds beside the published number.

Published numbers are copied from the papers' tables as the issue that asked for this command lists them
(MoRA: arXiv 2511.06225, ICLR 2026; DCP: Hu et al., NeurIPS 2024), each with its source.
"""

import dataclasses

from mora_jax.data import missing as missing_lib
from mora_jax.data import vqa

# The published tables' datasets, in their column order, by the names the tables print (each cell reads the
# dataset's headline metric: MM-IMDb F1-macro, Food-101 accuracy, Hateful Memes AUROC; data.metrics.PRIMARY).
NAMES = {"mm_imdb": "MM-IMDb", "upmc_food101": "Food-101", "hateful_memes": "Hateful Memes"}
PAPERS = tuple(NAMES)
TYPE_NAMES = {"text": "text missing", "image": "image missing", "both": "both missing"}
# easy-VQA: the study's two backbones (mora_jax.reproduce.runs.backbone_folder).
ALIGNED, MISMATCHED = "aligned", "mismatched"
# A Training's task: the CLIP classifier (recipes.get) or the multimodal LLM (recipes.mllm; tasks.MLLM).
CLASSIFY, MLLM = "classify", "mllm"


@dataclasses.dataclass(frozen=True)
class Source:
  paper: str
  table: str
  split: str = "test"

  def __str__(self) -> str:
    return f"{self.paper}, {self.table}, {self.split}"


MORA_PEFT = Source("MoRA (ICLR 2026)", "comparison with PEFT methods, missing rate 70%, type both")
MORA_MAIN = Source("MoRA (ICLR 2026)", "main results, mean over the three missing types per rate")
MORA_ABLATION = Source("MoRA (ICLR 2026)", "ablation of the components, missing rate 70%, type both")
DCP_TABLE4 = Source("DCP (NeurIPS 2024)", "Table 4, missing rate 70% per missing type")


@dataclasses.dataclass(frozen=True)
class Training:
  """One run's config without its seed. `overrides`: (key, value) pairs on the recipe; `backbone`: "" for the
  recipe's own, or easy-VQA's ALIGNED / MISMATCHED study backbones (CLASSIFY runs only); `task`: CLASSIFY, or
  MLLM for the easy-VQA multimodal LLM (`method`: a recipes.mllm name, "moka", "lora" or "moka_lambda0")."""
  dataset: str
  method: str
  type: str = "both"
  rate: float = 0.7
  overrides: tuple[tuple[str, str], ...] = ()
  backbone: str = ""
  task: str = CLASSIFY

  def __post_init__(self):
    if self.task not in (CLASSIFY, MLLM):
      raise ValueError(f"unknown task {self.task!r}: use {CLASSIFY!r} or {MLLM!r}.")
    if self.task == MLLM and (self.backbone or self.dataset != "easy_vqa"):
      raise ValueError("an MLLM run is easy-VQA's, on its recipe's vision tower: no dataset or study backbone.")

  @property
  def name(self) -> str:
    """The run's folder under <workdir>/<dataset>/: readable, and distinct for distinct configs (an MLLM run's
    starts with "mllm-"; a classifier run's is as it always was)."""
    parts = [*([MLLM] if self.task == MLLM else []), self.method,
             *(f"{key.rsplit('.', 1)[-1]}_{value}" for key, value in self.overrides)]
    if self.backbone:
      parts.append(f"backbone_{self.backbone}")
    parts.append(f"{self.type}{round(100 * self.rate)}")
    return "-".join(part.replace("/", "_").replace(" ", "_") for part in parts)


@dataclasses.dataclass(frozen=True)
class Measure:
  """A cell's reading of one training: `scenario` ("complete", "text_missing", "image_missing" or "mix") and
  `metric` ("" = the run's headline metric, eval.json's "metric") of its test, or of the re-test at `retest` =
  (type, rate). A metric with dots is a path into the scenario's results: "per_question_type.color" (an MLLM
  run's exact match on the colour questions; "/" cannot separate, as in "yes/no")."""
  training: Training
  scenario: str = "mix"
  metric: str = ""
  retest: tuple[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class Cell:
  """`measures` () for a published cell this library does not run (its table's `not_run` says why)."""
  row: str
  column: str
  measures: tuple[Measure, ...]
  published: float | None = None
  source: Source | None = None


@dataclasses.dataclass(frozen=True)
class Table:
  name: str
  title: str
  cells: tuple[Cell, ...]
  seeds: tuple[int, ...] = (42, 43, 44)
  note: str = ""  # printed under the table
  not_run: tuple[tuple[str, str], ...] = ()  # (row, why): published rows this library does not run
  plot_columns: tuple[str, ...] = ()  # () = every column

  def __post_init__(self):
    folders = [(t.dataset, t.name) for t in self.trainings]
    if len(folders) != len(set(folders)):  # Training.name keeps the last part of each override key
      raise ValueError(f"table {self.name}: two of its configs would share a run folder: {folders}.")
    if any(m.retest and m.training.task == MLLM for c in self.cells for m in c.measures):
      raise ValueError(f"table {self.name}: an MLLM run has no re-test here (runs.retest re-tests classifiers).")

  @property
  def rows(self) -> list[str]:
    return list(dict.fromkeys(c.row for c in self.cells))

  @property
  def columns(self) -> list[str]:
    return list(dict.fromkeys(c.column for c in self.cells))

  @property
  def trainings(self) -> list[Training]:
    return list(dict.fromkeys(m.training for c in self.cells for m in c.measures))

  @property
  def datasets(self) -> list[str]:
    return list(dict.fromkeys(t.dataset for t in self.trainings))

  def restricted(self, rows) -> "Table":
    """The table with only these rows (a subset to run first); an unknown row is an error listing the rows."""
    unknown = [row for row in rows if row not in self.rows]
    if unknown:
      raise ValueError(f"table {self.name} has no row {unknown[0]!r}; its rows: {', '.join(self.rows)}.")
    return dataclasses.replace(self, cells=tuple(c for c in self.cells if c.row in rows),
                               not_run=tuple(n for n in self.not_run if n[0] in rows))


def _by_dataset(row: str, method: str, published: tuple[float, ...], source: Source, **training) -> list[Cell]:
  """One row of a paper table at 70% both: a cell per dataset (PAPERS order)."""
  return [Cell(row, NAMES[d], (Measure(Training(d, method, **training)),), value, source)
          for d, value in zip(PAPERS, published)]


def mora_peft() -> Table:
  rows = [("MoRA", "mora", (52.97, 83.77, 70.15)), ("DoRA", "dora", (51.89, 82.34, 68.28)),
          ("LoRA", "lora", (51.35, 82.14, 67.97)), ("DCP", "dcp", (51.42, 81.87, 66.08))]
  cells = [cell for row, method, published in rows for cell in _by_dataset(row, method, published, MORA_PEFT)]
  cells += [Cell("linear probe", NAMES[d], (Measure(Training(d, "linear")),)) for d in PAPERS]
  cells += [Cell("BitFit", NAMES[d], (), value, MORA_PEFT) for d, value in zip(PAPERS, (48.57, 79.38, 64.10))]
  return Table("mora-peft", "MoRA against PEFT methods: 70% missing, type both (F1-macro / accuracy / AUROC, %)",
               tuple(cells), not_run=(("BitFit", "BitFit (training the backbone's biases) is not a method of this "
                                                 "library"),),
               note="The linear probe is not in the published table; it is the floor every adapter should clear.")


def mora_main() -> Table:
  published = {"mora": {"mm_imdb": (56.04, 51.96), "upmc_food101": (86.91, 82.09), "hateful_memes": (70.61, 68.56)},
               "dcp": {"mm_imdb": (52.92, 49.84), "upmc_food101": (85.49, 80.30), "hateful_memes": (64.27, 64.24)}}
  cells = []
  for row, method in (("MoRA", "mora"), ("DCP", "dcp")):
    for dataset in PAPERS:
      for rate, value in zip((0.5, 0.9), published[method][dataset]):
        measures = tuple(Measure(Training(dataset, method, kind, rate)) for kind in missing_lib.TYPES)
        cells.append(Cell(row, f"{NAMES[dataset]} {round(100 * rate)}%", measures, value, MORA_MAIN))
  return Table("mora-main", "MoRA and DCP at missing rates 50% and 90%, each the mean over the three missing types",
               tuple(cells))


def dcp_table4() -> Table:
  published = {"dcp": {"mm_imdb": (48.52, 53.14, 51.42), "upmc_food101": (78.87, 87.32, 81.87),
                       "hateful_memes": (62.82, 64.12, 66.08)},
               "mmp": {"mm_imdb": (45.64, 50.52, 48.12), "upmc_food101": (76.52, 85.64, 79.12),
                       "hateful_memes": (61.12, 63.24, 65.04)}}
  cells = [Cell(row, f"{NAMES[dataset]}, {TYPE_NAMES[kind]}", (Measure(Training(dataset, method, kind)),),
                value, DCP_TABLE4)
           for row, method in (("MMP", "mmp"), ("DCP", "dcp")) for dataset in PAPERS
           for kind, value in zip(missing_lib.TYPES, published[method][dataset])]
  return Table("dcp-table4", "MMP and DCP at 70% missing, per missing type (text missing: image 100% / text 30%; "
               "image missing: 30 / 100; both: 65 / 65)", tuple(cells))


def mora_ablation() -> Table:
  rows = [("MoRA", (), (52.97, 83.77, 70.15)),
          ("without the specific path", (("adapter.specific", "False"),), (51.18, 81.32, 68.71)),
          ("without the Gram coupling", (("adapter.gram", "none"),), (50.41, 80.31, 68.19)),
          ("with a learned Gram matrix", (("adapter.gram", "learned"),), (52.25, 83.37, 69.12))]
  cells = [cell for row, overrides, published in rows
           for cell in _by_dataset(row, "mora", published, MORA_ABLATION, overrides=overrides)]
  return Table("mora-ablation", "MoRA's components: 70% missing, type both", tuple(cells),
               note="The paper does not define the ablations in code; docs/method.md says how this library does.")


CROSS_RATES = (0.5, 0.7, 0.9)


def cross_scenario() -> Table:
  cells = []
  for dataset in PAPERS:
    for kind in missing_lib.TYPES:
      training = Training(dataset, "mora", kind, 0.7)
      row = f"{NAMES[dataset]}, trained {TYPE_NAMES[kind]} 70%"
      for test_kind in missing_lib.TYPES:
        for rate in CROSS_RATES:
          retest = None if (test_kind, rate) == (kind, 0.7) else (test_kind, rate)
          cells.append(Cell(row, f"{TYPE_NAMES[test_kind]} {round(100 * rate)}%",
                            (Measure(training, retest=retest),)))
  return Table("cross-scenario", "MoRA trained on one missing type at 70%, tested on every type at 50/70/90% "
               "(the dataset's headline metric; the paper describes this grid without numbers)", tuple(cells))


# The easy-VQA study: name -> (method, overrides, backbone).
EASY_VQA_RUNS = {
    "MoRA": ("mora", (), ALIGNED),
    "MokA (two-tower)": ("moka", (), ALIGNED),
    # Without the cross term MokA is per-tower LoRA at MokA's alpha (16, LoRA's is PEFT's 8): separates the two.
    "MokA, lambda 0": ("moka", (("adapter.lam", "0.0"),), ALIGNED),
    # The recipe's lr (1e-2) was set for MoRA; MokA's scale is twice LoRA's.
    "MokA (two-tower), lr 3e-3": ("moka", (("optim.lr", "0.003"),), ALIGNED),
    "LoRA": ("lora", (), ALIGNED),
    "LoRA, mismatched towers": ("lora", (), MISMATCHED),
    "MoRA, mismatched towers": ("mora", (), MISMATCHED),
    "linear probe": ("linear", (), ALIGNED),
    "DoRA": ("dora", (), ALIGNED),
    "MoRA (identity_start)": ("mora", (("adapter.variant", "identity_start"),), ALIGNED),
    "MoRA + MLP head": ("mora", (("head.type", "mlp"),), ALIGNED),
    # The prompt baselines in the study's run settings (recipes.PUBLISHED["easy_vqa"]["prompting"]).
    "MMP": ("mmp", (), ALIGNED),
    "DCP": ("dcp", (), ALIGNED),
}
EASY_VQA_SCENARIOS = {"complete": "complete", "text_missing": "text missing", "image_missing": "image missing",
                      "mix": "mix (70% both)"}
EASY_VQA_QUESTION_TYPES = ("yes/no", "color", "shape")


def easy_vqa() -> Table:
  cells = []
  for row, (method, overrides, backbone) in EASY_VQA_RUNS.items():
    training = Training("easy_vqa", method, overrides=overrides, backbone=backbone)
    cells += [Cell(row, name, (Measure(training, scenario),)) for scenario, name in EASY_VQA_SCENARIOS.items()]
    cells += [Cell(row, f"{question} {'complete' if scenario == 'complete' else 'mix'}",
                   (Measure(training, scenario, f"accuracy_{question}"),))
              for question in EASY_VQA_QUESTION_TYPES for scenario in ("complete", "mix")]
  return Table("easy-vqa", "easy-VQA on the embedded pre-trained CLIP, trained with 70% missing (both): accuracy "
               "(%) per test scenario and per question type", tuple(cells), seeds=(0, 1, 2),
               plot_columns=tuple(EASY_VQA_SCENARIOS.values()),
               note="Aligned vs mismatched towers: the mismatched backbone's vision and text towers come from two "
                    "independent pre-training runs (embedded seeds 0 and 1).")


# The easy-VQA MLLM study: name -> (recipes.mllm method, overrides). The recipe's image tokens and stage 1 came out
# of this ablation (docs/mllm.md); FORMER is the LLaVA-style recipe before it.
FORMER = (("image_tokens", "patches"), ("stage1.data", "captions"), ("stage1.steps", "150"), ("stage1.lr", "0.002"))
MLLM_RUNS = {
    "MokA": ("moka", ()),
    "LoRA": ("lora", ()),
    "MokA, lambda 0": ("moka_lambda0", ()),
    "MokA, without the class token": ("moka", (("image_tokens", "patches"),)),
    "MokA, stage 1 on captions": ("moka", (("stage1.data", "captions"),)),
    "MokA, linear projector": ("moka", (("projector", "linear"),)),
    "MokA, 2 stage-2 epochs": ("moka", (("epochs", "2"),)),
    "MokA, former recipe": ("moka", FORMER),
    "LoRA, former recipe": ("lora", FORMER),
    "MokA, former recipe, 2 epochs": ("moka", (*FORMER, ("epochs", "2"))),
    "MokA, former recipe, stage 1 600 steps at lr 1e-2": ("moka", (*FORMER[:2], ("stage1.steps", "600"),
                                                                    ("stage1.lr", "0.01"))),
}


def _mllm_cells(runs: dict, question_types, rate: float = 0.7, scenarios=EASY_VQA_SCENARIOS) -> tuple[Cell, ...]:
  """A row per run of `runs` (as MLLM_RUNS), trained with `rate` missing (both): exact match per test scenario of
  `scenarios`, then per question type on complete."""
  cells = []
  for row, (method, overrides) in runs.items():
    training = Training("easy_vqa", method, rate=rate, overrides=overrides, task=MLLM)
    cells += [Cell(row, name, (Measure(training, scenario),)) for scenario, name in scenarios.items()]
    cells += [Cell(row, f"{question} complete", (Measure(training, "complete", f"per_question_type.{question}"),))
              for question in question_types]
  return tuple(cells)


def mllm() -> Table:
  return Table("easy-vqa-mllm", "easy-VQA, MokA's native setting: the embedded CLIP vision tower and embedded LM (frozen), "
               "LLaVA-style; exact match (%) of the generated answer per test scenario and question type",
               _mllm_cells(MLLM_RUNS, EASY_VQA_QUESTION_TYPES), seeds=(42, 43, 44),
               plot_columns=tuple(EASY_VQA_SCENARIOS.values()),
               note="Trained with 70% missing (both). Reference points: 82.5%, the late-fusion ceiling on yes/no "
                    "(every two-tower method of the easy-vqa table, with or without the image); 66.8%, the "
                    "question-only prior (the best overall answer without the image, bench/easyvqa_priors.py).")


# The matching task (config.questions="match"): the MokA / LoRA / lambda-0 study on questions that need the image and
# the question together, trained on complete samples (a missing modality leaves a matching question unanswerable).
# MATCH is the recipe's change for it (docs/mllm.md).
MATCH = (("questions", "match"), ("epochs", "3"))
MATCH_RUNS = {"MokA": ("moka", MATCH), "LoRA": ("lora", MATCH), "MokA, lambda 0": ("moka_lambda0", MATCH),
              "MokA, 6 epochs": ("moka", (MATCH[0], ("epochs", "6"))),
              "LoRA, 6 epochs": ("lora", (MATCH[0], ("epochs", "6")))}
MATCH_SCENARIOS = {k: v for k, v in EASY_VQA_SCENARIOS.items() if k != "mix"}  # trained complete: mix = complete


def mllm_match() -> Table:
  return Table("easy-vqa-match", "The easy-VQA MLLM on matching questions (\"is there a red circle in the image?\"): "
               "exact match (%) per test scenario and question type",
               _mllm_cells(MATCH_RUNS, vqa.MATCH_TYPES, rate=0.0, scenarios=MATCH_SCENARIOS), seeds=(42, 43, 44),
               plot_columns=tuple(MATCH_SCENARIOS.values()),
               note="Trained on complete samples. Reference points (bench/easyvqa_priors.py): the question alone "
                    "50.2%, the image alone 50.0%, both summed 52.4% (late fusion at its best: a logistic regression "
                    "on the image's true colour and shape and the question).")


TABLES = {table.name: table for table in (mora_peft(), mora_main(), dcp_table4(), mora_ablation(), cross_scenario(),
                                          easy_vqa(), mllm(), mllm_match())}
