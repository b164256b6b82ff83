"""MM-IMDb, UPMC Food-101 and Hateful Memes builders on tiny raw layouts (and an Arrow file) the tests write."""

import functools
import io
import json
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mora_jax.data import preprocess
from mora_jax.data.builders import manual
from tests.helpers import write_arrow


def image_bytes(size, mode="RGB", fmt="JPEG") -> bytes:
  buffer = io.BytesIO()
  color = {"RGB": (200, 10, 10), "L": 90, "CMYK": (0, 50, 100, 0), "RGBA": (1, 2, 3, 100)}[mode]
  Image.new(mode, size, color).save(buffer, fmt)
  return buffer.getvalue()


def build(builder_cls, data_dir, manual_dir):
  builder = builder_cls(data_dir=str(data_dir))
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def records(builder, split):
  source = builder.as_data_source(split)
  return {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}


def write_mmimdb(root, genres_of_0002=("Comedy", "Romance")):
  (root / "images").mkdir(parents=True)
  (root / "labels").mkdir()
  movies = {"0001": (["a plot", "another plot", "third plot"], ["Drama"]),
            "0002": (["only plot"], list(genres_of_0002)), "0003": (["p"], ["Horror", "Film-Noir"])}
  for i, (movie, (plots, genres)) in enumerate(movies.items()):
    (root / "images" / f"{movie}.jpeg").write_bytes(image_bytes((40 + i, 30), ["RGB", "L", "CMYK"][i]))
    (root / "labels" / f"{movie}.json").write_text(json.dumps({"plot": plots, "genres": genres}))
  (root / "split.json").write_text(json.dumps({"train": ["0001", "0002"], "dev": ["0003"], "test": ["0003"]}))


def test_mmimdb_raw_layout(tmp_path):
  write_mmimdb(tmp_path / "raw")
  builder = build(manual.MmImdb, tmp_path / "data", tmp_path / "raw")
  train = records(builder, "train")
  assert set(train) == {"0001", "0002"}
  assert [t.decode() for t in train["0001"]["texts"]] == ["a plot", "another plot", "third plot"]
  expected = np.zeros(23, np.int8)
  expected[[manual.MMIMDB_GENRES.index("Comedy"), manual.MMIMDB_GENRES.index("Romance")]] = 1
  np.testing.assert_array_equal(train["0002"]["label"], expected)
  assert Image.open(io.BytesIO(train["0001"]["image"])).size == (40, 30)
  assert len(builder.as_data_source("validation")) == len(builder.as_data_source("test")) == 1


def test_mmimdb_genres_outside_the_23_are_ignored_and_counted(tmp_path):
  from mora_jax import data  # pylint: disable=import-outside-toplevel
  write_mmimdb(tmp_path / "raw", genres_of_0002=("Comedy", "Reality-TV", "News"))
  labels = json.loads((tmp_path / "raw" / "labels" / "0001.json").read_text())
  (tmp_path / "raw" / "labels" / "0001.json").write_text(json.dumps({**labels, "genres": ["News"]}))
  logged = []
  builder = data.prepare("mm_imdb", tmp_path / "data", tmp_path / "raw", log=logged.append)
  train = records(builder, "train")
  assert train["0002"]["label"].tolist() == (np.asarray(manual.MMIMDB_GENRES) == "Comedy").astype(int).tolist()
  assert not train["0001"]["label"].any()
  assert logged == ["MM-IMDb train: genres outside the 23 classes ignored (News 2, Reality-TV 1); 1 of 2 movies "
                    "are left with none of the 23."]


def test_food101_raw_layout_drops_samples_without_text(tmp_path):
  root = tmp_path / "raw"
  files = {"train": ["apple_pie_1.jpg", "apple_pie_2.jpg", "baby_back_ribs_7.jpg"], "val": ["apple_pie_3.jpg"],
           "test": ["baby_back_ribs_9.jpg"]}
  for split, names in files.items():
    for k, name in enumerate(names):
      folder = root / "images" / ("test" if split == "test" else "train") / name.rsplit("_", 1)[0]
      folder.mkdir(parents=True, exist_ok=True)
      (folder / name).write_bytes(image_bytes((50 + k, 60), "RGBA", "PNG"))
  (root / "class_idx.json").write_text(json.dumps({"apple_pie": 0, "baby_back_ribs": 1}))
  texts = {name: f"text of {name}" for names in files.values() for name in names}
  del texts["apple_pie_2.jpg"]
  (root / "text.json").write_text(json.dumps(texts))
  (root / "split.json").write_text(json.dumps(files))
  builder = build(manual.UpmcFood101, tmp_path / "data", root)
  train = records(builder, "train")
  assert set(train) == {"apple_pie_1.jpg", "baby_back_ribs_7.jpg"}
  assert train["baby_back_ribs_7.jpg"]["label"] == 1
  assert [t.decode() for t in train["apple_pie_1.jpg"]["texts"]] == ["text of apple_pie_1.jpg"]
  assert set(records(builder, "validation")) == {"apple_pie_3.jpg"}


def write_memes(root, bad_label=False):
  (root / "img").mkdir(parents=True)
  for split, rows in {"train": [(1, 0), (2, 1)], "dev": [(3, 1)], "test": [(4, 0), (5, 1)]}.items():
    lines = []
    for meme, label in rows:
      (root / "img" / f"{meme:05d}.png").write_bytes(image_bytes((64, 48 + meme), "RGB", "PNG"))
      lines.append(json.dumps({"id": meme, "img": f"img/{meme:05d}.png", "text": f"meme {meme}",
                               "label": 3 if bad_label and meme == 2 else label}))
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_hateful_memes_raw_layout(tmp_path):
  write_memes(tmp_path / "raw")
  builder = build(manual.HatefulMemes, tmp_path / "data", tmp_path / "raw")
  test = records(builder, "test")
  assert {k: int(r["label"]) for k, r in test.items()} == {"4": 0, "5": 1}
  assert len(builder.as_data_source("train")) == 2 and len(builder.as_data_source("validation")) == 1


def test_label_outside_classes_names_the_sample(tmp_path):
  write_memes(tmp_path / "raw", bad_label=True)
  with pytest.raises(ValueError, match="train.jsonl: sample 2 has label 3 outside 0..1"):
    build(manual.HatefulMemes, tmp_path / "data", tmp_path / "raw")


def test_missing_manual_files_point_to_the_instructions(tmp_path):
  (tmp_path / "raw").mkdir()
  (tmp_path / "raw" / "README").write_text("not the dataset")
  with pytest.raises(FileNotFoundError, match="split.json not found.*MmImdb.MANUAL_DOWNLOAD_INSTRUCTIONS"):
    build(manual.MmImdb, tmp_path / "data", tmp_path / "raw")
  with pytest.raises(FileNotFoundError, match="(?s)nowhere does not exist or is empty.*Download the Hateful Memes"):
    build(manual.HatefulMemes, tmp_path / "data2", tmp_path / "nowhere")


def test_authors_arrow_files(tmp_path):
  pytest.importorskip("pyarrow")
  root = tmp_path / "raw"
  root.mkdir()
  for k, split in enumerate(("train", "val", "test")):
    write_arrow(root / f"{split}.arrow", {"image": [image_bytes((30, 30)), image_bytes((20, 40), "L")],
                                          "text": [[f"{split} one"], [f"{split} two"]], "label": [0, 1 - k % 2]})
  builder = build(manual.HatefulMemes, tmp_path / "data", root)
  train = records(builder, "train")
  assert {k: [t.decode() for t in r["texts"]] for k, r in train.items()} == {
      "train-0": ["train one"], "train-1": ["train two"]}
  assert int(records(builder, "validation")["validation-1"]["label"]) == 0


@pytest.mark.parametrize("dataset", ["hateful_memes", "mm_imdb"])
def test_the_authors_tables_give_every_sample_the_code_of_its_own_row(tmp_path, dataset):
  """The authors' Arrow files (60 rows a split) and their tables, written with torch.save under their names in
  data_dir/missing_tables: through data.load and the pipeline, row i's samples get entry i, and no table is
  generated. Keys ("train-0", ...) are what TFDS would have hash-shuffled before."""
  torch = pytest.importorskip("torch", reason="the authors' tables are written with torch.save")
  from mora_jax import data  # pylint: disable=import-outside-toplevel
  from mora_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  rows, root, tables = 60, tmp_path / "raw", tmp_path / "data" / "missing_tables"
  root.mkdir()
  tables.mkdir(parents=True)
  alias = {"hateful_memes": "hatememes", "mm_imdb": "mmimdb"}[dataset]
  rng = np.random.RandomState(0)
  codes = {}
  for split in ("train", "val", "test"):
    texts = [[f"{split} row {r} plot {k}" for k in range(1 + r % 3)] for r in range(rows)]
    columns = {"image": [image_bytes((24, 24)) for _ in range(rows)]}
    if dataset == "mm_imdb":
      columns.update(plots=texts, label=[np.eye(23, dtype=int)[r % 23].tolist() for r in range(rows)])
    else:
      columns.update(text=[t[:1] for t in texts], label=[r % 2 for r in range(rows)])
    write_arrow(root / f"{split}.arrow", columns)
    codes[split] = rng.choice([0, 1, 2], rows).astype(np.float32)  # the authors save float tensors
    if split != "test":
      torch.save(torch.tensor(codes[split]), tables / f"{alias}_split{split}_missing_both_0.7.pt")
  tokenizer = tokenizers.byte_level_clip_tokenizer(tmp_path / "tok")
  logged = []
  for split, name in (("train", "train"), ("validation", "val")):
    ds = data.load(dataset, split, tmp_path / "data", root, missing=data.Missing(rate=0.7, type="both"),
                   log=logged.append)
    assert f"{dataset}/{split}: missing both 0.7: provided table {tables / f'{alias}_split{name}_missing_both_0.7.pt'}" in logged
    row_of = [int(ds.source[i]["text"].decode().split()[2]) for i in range(len(ds.source))]
    assert sorted(set(row_of)) == list(range(rows))
    np.testing.assert_array_equal(ds.table, codes[name][row_of])
    prep = data.Preprocessing(image=preprocess.ImageProcessing.clip(32), max_length=16)
    batches = list(data.batches(ds, 16, tokenizer, train=False, prep=prep))
    index = np.concatenate([b["index"] for b in batches])
    missing_codes = np.concatenate([b["inputs"].missing for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(missing_codes[valid], codes[name][np.asarray(row_of)[index[valid]]])
  assert not list(tables.glob("*.npy"))  # nothing generated for train and val


def test_a_record_out_of_its_row_is_an_error():
  from mora_jax.data import datasets  # pylint: disable=import-outside-toplevel
  view = datasets._TextView([{"row": 0, "texts": [b"a"]}, {"row": 2, "texts": [b"b"]}], True, "somewhere/1.1.0")
  assert view[0]["text"] == b"a"
  with pytest.raises(ValueError, match="somewhere/1.1.0: record 1 is source row 2.*prepare the dataset again"):
    view[1]  # pylint: disable=pointless-statement


def test_mmimdb_one_sample_per_plot_shares_the_movie_missing_flag(tmp_path):
  from mora_jax import data  # pylint: disable=import-outside-toplevel
  write_mmimdb(tmp_path / "raw")
  spec = data.Missing(rate=0.5, type="text", seed=0)
  ds = data.load("mm_imdb", "train", tmp_path / "data", tmp_path / "raw", missing=spec)
  assert len(ds.source) == 4  # movie 0001 has 3 plots, 0002 has 1
  ids = [ds.source[i]["id"].decode() for i in range(4)]
  texts = [ds.source[i]["text"].decode() for i in range(4)]
  assert sorted(zip(ids, texts)) == [("0001", "a plot"), ("0001", "another plot"), ("0001", "third plot"),
                                     ("0002", "only plot")]
  by_movie = {}
  for movie, code in zip(ids, ds.table):
    by_movie.setdefault(movie, set()).add(int(code))
  assert all(len(codes) == 1 for codes in by_movie.values())  # the flag belongs to the movie
  assert sorted(c.pop() for c in by_movie.values()) == [0, 1]  # int(2 movies * 0.5) = 1 movie loses its text
  assert ds.multi_label and ds.num_classes == 23
  first_only = data.load("mm_imdb", "train", tmp_path / "data", tmp_path / "raw", missing=spec,
                         one_sample_per_text=False)
  assert len(first_only.source) == 2
  assert [s.tolist() for s in (ds.scenario("complete").table, ds.scenario("image_missing").table)] == [[0] * 4,
                                                                                                     [2] * 4]


def test_corrupt_images_of_every_split_are_one_error_when_prepared_and_a_repaired_file_prepares_again(tmp_path):
  from mora_jax import data  # pylint: disable=import-outside-toplevel
  from mora_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  write_memes(tmp_path / "raw")
  good = (tmp_path / "raw" / "img" / "00004.png").read_bytes()
  (tmp_path / "raw" / "img" / "00004.png").write_bytes(good[:60])  # a test image, truncated
  (tmp_path / "raw" / "img" / "00002.png").write_bytes(b"not an image")  # a train one
  load = functools.partial(data.load, "hateful_memes", "test", tmp_path / "data", tmp_path / "raw",
                           missing=data.Missing(rate=0.0))
  with pytest.raises(ValueError, match=r"^hateful_memes: 2 of 5 images do not decode .*: img/00002.png \(train\), "
                     r"img/00004.png \(test\); .*Repair those files .* or pass --config.skip_corrupt=True") as error:
    load()
  assert "\n" not in str(error.value) and "BytesIO" not in str(error.value)
  logged = []
  ds = load(skip_corrupt=True, log=logged.append)  # the prepared files are kept: a warning, once per process
  load(skip_corrupt=True, log=logged.append)
  assert sum(line.startswith("warning: hateful_memes: 2 of 5 images do not decode") for line in logged) == 1
  tokenizer = tokenizers.byte_level_clip_tokenizer(tmp_path / "tok")
  with pytest.raises(ValueError, match=r"hateful_memes/test sample 4 \(img/00004.png\): corrupt or truncated"):
    list(data.batches(ds, 2, tokenizer, train=False))
  rows = list(data.batches(ds, 2, tokenizer, train=False, skip_corrupt=True))
  assert sum(int(b["corrupt"].sum()) for b in rows) == 1 and sum(int(b["valid"].sum()) for b in rows) == 1
  for name, content in (("00002.png", image_bytes((64, 50), "RGB", "PNG")), ("00004.png", good)):
    (tmp_path / "raw" / "img" / name).write_bytes(content)
  logged.clear()
  repaired = load(log=logged.append)
  assert any("changed since hateful_memes was prepared from them; preparing it again" in line for line in logged)
  assert all(b["valid"].all() for b in data.batches(repaired, 2, tokenizer, train=False))
  # The decoded-pixel store and the prefix cache of the repaired files are other ones: both keys hold the
  # fingerprint of the raw files the split was prepared from.
  from mora_jax.data import pixel_store  # pylint: disable=import-outside-toplevel
  from mora_jax.train import prefix_cache  # pylint: disable=import-outside-toplevel
  before, after = ds.source.sources, repaired.source.sources
  assert before and after and before != after
  prep = data.Preprocessing()
  assert pixel_store.key("hateful_memes", "test", 5, prep, before)["sources"] == before
  assert pixel_store.key("hateful_memes", "test", 5, prep, after)["sources"] == after
  job = types.SimpleNamespace(backbone=types.SimpleNamespace(identity={"sha256": "0"}, tokenizer=tokenizer),
                              settings=types.SimpleNamespace(backbone_dtype="float32"), prep=prep)
  assert [prefix_cache.key(job, d, 1, np.float32)["sources"] for d in (ds, repaired)] == [before, after]


def test_a_corrupt_image_message_names_the_file_not_the_stream():
  with pytest.raises(ValueError, match=r"^img/7.png: corrupt or truncated image \(cannot identify image file\)\.$"):
    preprocess.decode_image(b"not an image", "img/7.png")
