"""The TFDS source on real array_record files, without TensorFlow and without downloads.

A tiny `imagenet2012` (3 classes x 4 train / 2 val JPEGs from imagenet_fixture) is written by
TFDS's own builder (the registered imagenet2012 builder, file_format='array_record'), with only
its split generators replaced: the real ones read the ImageNet tars through tf.io.gfile. Nothing
is mocked on the reading side: the loader and train.py open it with tfds.data_source exactly as
`tfds build imagenet2012 --file_format=array_record` output would be opened.
"""

import importlib
import importlib.resources
import io
import json
import os
import shutil
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

import fec_jax.data as fd  # noqa: E402
from fec_jax.data import classes, sources, transforms  # noqa: E402
from tests.imagenet_fixture import WNIDS, make_imagenet_folder  # noqa: E402
from configs import fec_small  # noqa: E402
from fec_jax import cli, reporting, tasks  # noqa: E402
from tests.train_fixture import saved_steps, train  # noqa: E402

PER_CLASS, VAL_PER_CLASS, NUM_CLASSES = 4, 2, 3
IMAGENET_CLASSES = 1000  # imagenet2012's label feature; WNIDS are its first classes in order


@pytest.fixture(scope="module", autouse=True)
def no_dataset_info_from_gcs():
  """TFDS looks on GCS for the info of a dataset whose data_dir lacks it (each builder before its
  build) and leaves an empty temporary directory behind each time, found or not: not here."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tfds.core.DatasetInfo, "initialize_from_bucket", lambda self: None)
    yield


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """data_dir holding imagenet2012/<version>/imagenet2012-{train,validation}.array_record-*."""
  folder = make_imagenet_folder(
      tmp_path_factory.mktemp("jpegs"),
      num_classes=NUM_CLASSES,
      per_class=PER_CLASS,
      val_per_class=VAL_PER_CLASS,
  )
  data_dir = str(tmp_path_factory.mktemp("tfds"))

  def split_generators(self, dl_manager):
    return [
        tfds.core.SplitGenerator(name=s, gen_kwargs={"split_dir": os.path.join(folder, d)})
        for s, d in (("train", "train"), ("validation", "val"))
    ]

  def generate_examples(self, split_dir):
    for wnid in sorted(os.listdir(split_dir)):
      for fname in sorted(os.listdir(os.path.join(split_dir, wnid))):
        with open(os.path.join(split_dir, wnid, fname), "rb") as f:
          yield fname, {"image": f.read(), "label": wnid, "file_name": fname}

  builder_cls = type(tfds.builder("imagenet2012", data_dir=data_dir))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(builder_cls, "_split_generators", split_generators)
    mp.setattr(builder_cls, "_generate_examples", generate_examples)
    try:
      importlib.import_module("importlib_resources")
    except ImportError:  # TFDS's builder uses the backport, a dependency only below Python 3.9
      mp.setitem(sys.modules, "importlib_resources", importlib.resources)
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
  return data_dir


def _cfg(data_dir, **kw):
  """The full official recipe (RandAugment, random erasing, Mixup/CutMix), 32x32, in-process."""
  cfg = fd.default_config()
  cfg.source, cfg.tfds_data_dir, cfg.image_size = "tfds", data_dir, 32
  cfg.num_classes, cfg.num_workers = IMAGENET_CLASSES, 0
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def _label(key: str) -> int:
  return WNIDS.index(key.split("_")[0])


def test_records_and_counts(tfds_dir):
  cfg = _cfg(tfds_dir)
  assert fd.num_examples(cfg, "train") == NUM_CLASSES * PER_CLASS
  assert fd.num_examples(cfg, "val") == NUM_CLASSES * VAL_PER_CLASS
  assert fd.steps_per_epoch(cfg, 4) == 3 and fd.num_eval_batches(cfg, 4) == 2
  src = sources.make_source(cfg, "train")
  records = [src[i] for i in range(len(src))]
  assert sorted(r["key"] for r in records) == sorted(
      f"{w}_{i}.JPEG" for w in WNIDS[:NUM_CLASSES] for i in range(PER_CLASS)
  )
  for r in records:
    assert isinstance(r["encoded"], bytes) and r["label"] == _label(r["key"])
    img, converted = transforms.decode(r["encoded"])
    assert img.shape == (64, 80, 3) and not converted
  with pytest.raises(ValueError, match="1000 classes but config.data.num_classes is 3"):
    fd.create_loader(_cfg(tfds_dir, num_classes=3), "train", 4, seed=0)


def test_a_data_dir_without_the_dataset_says_how_to_build_it(tmp_path, monkeypatch, caplog):
  """One line: where it looked (TFDS's default for an empty data_dir) and the build command; not
  TFDS's own note on a TFRECORD copy 'already prepared' there, nor its warning on the folder."""
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "default"))
  for data_dir, shown in ((str(tmp_path / "nowhere"), "nowhere"), ("", "default")):
    with pytest.raises(fd.DataNotFoundError) as e:
      sources.make_source(_cfg(data_dir), "train")
    message = str(e.value)
    assert f"not found in data_dir '{tmp_path / shown}'" in message
    assert "tfds build imagenet2012" in message and "TFRECORD" not in message
    assert "\n" not in message
  assert not caplog.records


PETS = ("cat", "dog", "frog", "ship")


def _build(data_dir, class_name, features, num_examples=(8, 4), label=lambda split, i: i % 4):
  """Builds TFDS dataset `class_name` (snake-cased) in data_dir as a user would, without
  TensorFlow: a GeneratorBasedBuilder (not registered, so it is read back from its files alone,
  as in a run that does not import it) yielding pre-encoded JPEG bytes, array_record. `features`:
  {name: 'image' | a tfds feature}; 'image' features get the JPEG, the others label(split, i).
  Splits 'train' and 'test' of num_examples records."""

  def generate_examples(self, split, n):
    for i in range(n):
      img = Image.fromarray(np.full((16, 24, 3), 60 * (i % 4), np.uint8))
      buf = io.BytesIO()
      img.save(buf, "JPEG")
      yield f"{i}", {
          k: buf.getvalue() if v == "image" else label(split, i) for k, v in features.items()
      }

  def info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {k: tfds.features.Image() if v == "image" else v for k, v in features.items()}
        ),
    )

  def split_generators(self, dl_manager):
    return {s: self._generate_examples(s, n) for s, n in zip(("train", "test"), num_examples)}

  namespace = {
      "VERSION": tfds.core.Version("1.0.0"),
      "_info": info,
      "_split_generators": split_generators,
      "_generate_examples": generate_examples,
  }
  cls = type(class_name, (tfds.core.GeneratorBasedBuilder,), namespace, skip_registration=True)
  builder = cls(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP
      )
  )
  return builder.name


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory):
  """data_dir holding pets (image, label: ClassLabel cat/dog/frog/ship) and variants."""
  data_dir = tmp_path_factory.mktemp("custom")
  _build(data_dir, "Pets", {"image": "image", "label": tfds.features.ClassLabel(names=PETS)})
  return str(data_dir)


def _pets_cfg(data_dir, **kw):
  return _cfg(
      data_dir, **{"tfds_name": "pets", "num_classes": len(PETS), "val_split": "test", **kw}
  )


def test_a_custom_dataset_built_without_tensorflow(custom_dir):
  """docs/data.md's own-dataset recipe: a GeneratorBasedBuilder yielding JPEG bytes builds without
  TensorFlow, and fec-jax reads it back from its files (its builder is not registered)."""
  with pytest.raises(ImportError):
    importlib.import_module("tensorflow")
  cfg = _pets_cfg(custom_dir)
  assert fd.num_examples(cfg, "train") == 8 and fd.num_examples(cfg, "val") == 4
  src = sources.make_source(cfg, "train")
  assert sorted(src[i]["label"] for i in range(len(src))) == [0, 0, 1, 1, 2, 2, 3, 3]
  assert transforms.decode(src[0]["encoded"])[0].shape == (16, 24, 3)


@pytest.fixture
def no_records(monkeypatch):
  """Fails a test that opens a split's records: its error must come from dataset_info alone."""

  def as_data_source(self, *args, **kwargs):
    raise AssertionError("records opened")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", as_data_source)


@pytest.mark.parametrize(
    "features, has",
    [
        ({"img": "image", "label": tfds.features.ClassLabel(names=PETS)}, "'img' (Image)"),
        (
            {"image": "image", "category": tfds.features.ClassLabel(names=PETS)},
            "'category' (ClassLabel)",
        ),
        ({"image": "image", "label": tfds.features.Scalar(np.int64)}, "'label' (Scalar)"),
    ],
)
def test_features_other_than_image_and_label_are_named(tmp_path, no_records, features, has):
  """A label feature of another name was a KeyError, an image of another name TFDS's 'Error
  while flattening dict', a label that is no ClassLabel was read unchecked (labels beyond
  num_classes train into NaN): one error naming what the dataset has and what fec-jax reads."""
  _build(tmp_path, "Odd", features)
  with pytest.raises(ValueError) as e:
    sources.make_source(_cfg(str(tmp_path), tfds_name="odd", num_classes=4), "train")
  message = str(e.value)
  assert has in message and "\n" not in message
  assert "fec-jax reads 'image' (tfds.features.Image, encoded JPEG/PNG) and 'label' " in message
  assert "(tfds.features.ClassLabel)" in message


def _error(cfg, split="train") -> str:
  """The one-line DataNotFoundError that make_source gives for cfg and split."""
  with pytest.raises(fd.DataNotFoundError) as e:
    sources.make_source(cfg, split)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_records_without_a_label_are_an_error(tmp_path):
  """ClassLabel's -1 ("no label", every record of imagenet2012's 'test' split) trained and
  evaluated silently as a class of none (one-hot zeros, 0% accuracy): an unlabelled split is an
  error when its source is made (before train.py compiles a step); an unlabelled record in a
  labelled split when it is read (a ValueError: with several processes, one process's alone).
  One line each, naming the split and the record."""
  _build(
      tmp_path,
      "Unlabelled",
      {"image": "image", "label": tfds.features.ClassLabel(names=PETS)},
      label=lambda split, i: -1 if split == "test" or i == 5 else i % 4,
  )
  cfg = _cfg(str(tmp_path), tfds_name="unlabelled", num_classes=len(PETS), val_split="test")
  message = _error(cfg, "val")
  assert message.startswith(f"split 'test' of TFDS unlabelled ({tmp_path}/unlabelled/1.0.0) is ")
  assert "is not labelled (its first record's label is -1, ClassLabel's \"no label\"); " in message
  assert message.endswith(sources.LABELLED_SPLITS)
  train, labels, errors = sources.make_source(cfg, "train"), [], []
  for i in range(8):  # TFDS stores the records in an order of its own
    try:
      labels.append(train[i]["label"])
    except ValueError as e:  # not DataNotFoundError, which the loop takes for every process's
      errors.append(str(e))
  assert sorted(labels) == [0, 0, 1, 2, 2, 3, 3]  # the 8 records but the one labelled -1
  assert len(errors) == 1 and errors[0].startswith("record ")
  assert " of split 'train' of TFDS unlabelled (" in errors[0] and "has no label (-1)" in errors[0]


def test_a_name_not_in_the_data_dir_lists_the_datasets_there(custom_dir):
  """Not the ImageNet instructions for a dataset of one's own; they stay for imagenet2012."""
  message = _error(_pets_cfg(custom_dir, tfds_name="pest"))
  assert f"TFDS pest was not found in data_dir {custom_dir!r} (it holds the datasets pets)" in (
      message
  )
  assert f"expected {os.path.join(custom_dir, 'pest', '<version>', 'dataset_info.json')}" in message
  assert "ImageNet" not in message and "tfds build" not in message
  message = _error(_cfg(custom_dir))
  assert "(it holds the datasets pets); ImageNet needs a manual download" in message
  assert "tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record" in message


def test_a_data_dir_at_the_datasets_own_folder_says_to_give_its_parent(custom_dir):
  pets = os.path.join(custom_dir, "pets")
  message = _error(_pets_cfg(pets))
  assert f"{pets!r} is a dataset's own folder (it holds the version folders 1.0.0)" in message
  assert message.endswith(f"give its parent, --config.data.tfds_data_dir={custom_dir}")
  message = _error(_pets_cfg(os.path.join(pets, "1.0.0")))
  assert "is a dataset's version folder (it holds dataset_info.json)" in message
  assert message.endswith(f"--config.data.tfds_data_dir={custom_dir}")


def test_a_tfrecord_copy_says_how_to_build_array_record(tmp_path, no_records):
  """TFDS's own cause was cut off after 'Possible root causes:'. The copy is made an array_record
  build relabelled: building tfrecord files needs TensorFlow."""
  _build(tmp_path, "Pets", {"image": "image", "label": tfds.features.ClassLabel(names=PETS)})
  version_dir = tmp_path / "pets" / "1.0.0"
  info_file = version_dir / "dataset_info.json"
  info = json.loads(info_file.read_text())
  info_file.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
  for f in version_dir.glob("*.array_record-*"):
    f.rename(str(f).replace(".array_record-", ".tfrecord-"))
  message = _error(_pets_cfg(str(tmp_path)))
  assert f"TFDS pets in {version_dir} was prepared as tfrecord; fec-jax reads array_record" in (
      message
  )
  assert "`tfds build pets --data_dir=<data_dir> --file_format=array_record`" in message
  assert "file_format='array_record' given to the builder" in message


def test_a_missing_split_names_the_splits_and_the_fields(custom_dir, no_records):
  message = _error(_cfg(custom_dir, tfds_name="pets", num_classes=len(PETS)), "val")
  assert message == (
      "TFDS pets has no split 'validation': its splits are train, test; set "
      "config.data.train_split / config.data.val_split to one of them"
  )


def test_a_missing_version_names_the_versions(custom_dir, tfds_dir, no_records):
  message = _error(_pets_cfg(custom_dir, tfds_name="pets:2.0.0"))
  assert f"TFDS pets has no version 2.0.0 in {os.path.join(custom_dir, 'pets')} (it holds the " in (
      message
  )
  assert "versions 1.0.0): set config.data.tfds_name to pets:<version>" in message
  assert str(sources.tfds_builder("pets:1.0.0", custom_dir).version) == "1.0.0"
  # A registered builder (TFDS's imagenet2012 knows 5.1.0 and 5.0.0): the versions on disk
  version = os.listdir(os.path.join(tfds_dir, "imagenet2012"))[0]
  message = _error(_cfg(tfds_dir, tfds_name="imagenet2012:5.0.0"))
  assert f"no version 5.0.0 in {os.path.join(tfds_dir, 'imagenet2012')} (it holds the " in message
  assert f"versions {version})" in message


def test_a_tfds_data_dir_needs_source_tfds(custom_dir):
  """It was ignored: the run read the demo digits or asked for an ImageNet folder."""
  for source in ("folder", "demo"):
    cfg = _pets_cfg(custom_dir, source=source)
    with pytest.raises(ValueError) as e:
      fd.validate(cfg)
    assert str(e.value) == (
        f"config.data: tfds_data_dir {custom_dir!r} is read by source 'tfds' only, and source is "
        f"'{source}': give --config.data.source=tfds to read TFDS pets there, or "
        "--config.data.tfds_data_dir=''"
    )
  fd.validate(_pets_cfg(custom_dir))
  fd.validate(_pets_cfg("", source="demo"))


def test_class_names_of_a_tfds_run_are_its_classlabel_names(custom_dir, tfds_dir, tmp_path):
  """eval.py --per_class named them 'class 0', ..., and a 1000-class dataset's ImageNet's. As for
  folders: ImageNet's names where the ClassLabel's are its wnids (imagenet2012's)."""
  assert classes.classification_names(_pets_cfg(custom_dir), 4) == PETS
  run = {"source": "tfds", "tfds_name": "pets", "tfds_data_dir": custom_dir}  # its config.json
  assert classes.classification_names(run, 4) == PETS
  assert classes.classification_names(run, 5) is None  # not the run's dataset any more
  assert classes.classification_names({**run, "tfds_data_dir": str(tmp_path)}, 4) is None
  assert classes.classification_names(_cfg(tfds_dir), 1000)[1].startswith("goldfish")
  kinds = tuple(f"kind {i}" for i in range(1000))
  _build(
      tmp_path, "Kinds", {"image": "image", "label": tfds.features.ClassLabel(names=kinds)}, (1, 1)
  )
  _build(
      tmp_path,
      "Unnamed",
      {"image": "image", "label": tfds.features.ClassLabel(num_classes=1000)},
      (1, 1),
  )
  mine = {**run, "tfds_data_dir": str(tmp_path)}
  assert classes.classification_names({**mine, "tfds_name": "kinds"}, 1000) == kinds
  assert classes.classification_names({**mine, "tfds_name": "unnamed"}, 1000)[7] == "class 7"


def _label_names(data_config) -> fd.LabelNames | None:
  """Task.data_label_names of fec_small's classification config on `data_config`: what a fresh run
  records in its classes.json, and a resume and eval.py compare with the record."""
  config = fec_small.get_config()
  config.data = data_config
  return tasks.get(config).data_label_names()


def test_label_names_of_a_tfds_run_are_its_classlabel_names_from_dataset_info(
    custom_dir, tfds_dir, no_records
):
  """The ClassLabel's names as TFDS gives them (imagenet2012's wnids too: eval.py names those
  classes ImageNet's), and where: the dataset and its data_dir. Read from dataset_info alone,
  no record (a run's and each evaluation's start reads them)."""
  assert _label_names(_pets_cfg(custom_dir)) == fd.LabelNames(
      PETS, f"label names of TFDS pets (data_dir {custom_dir})"
  )
  names, origin = _label_names(_cfg(tfds_dir))
  assert len(names) == IMAGENET_CLASSES and names[:NUM_CLASSES] == tuple(WNIDS[:NUM_CLASSES])
  assert origin == f"label names of TFDS imagenet2012 (data_dir {tfds_dir})"


def test_a_tfds_dataset_rebuilt_with_other_names_is_a_label_names_change(
    custom_dir, tmp_path, no_records
):
  """tasks.label_names_change, which stops a resume and eval.py, for a run on a TFDS dataset
  rebuilt since it started with other ClassLabel names: in its own data_dir (the labels index
  other classes under the same config), or another one's with a class more; the same names in
  another data_dir are no change."""
  workdir, data_dir = str(tmp_path / "run"), tmp_path / "data"
  record = os.path.join(workdir, reporting.CLASSES_FILE)
  label = lambda names: {"image": "image", "label": tfds.features.ClassLabel(names=names)}
  _build(data_dir, "Pets", label(PETS))
  cfg = _pets_cfg(str(data_dir))
  reporting.write_classes(workdir, _label_names(cfg))  # as a fresh run does
  assert tasks.label_names_change(_label_names(cfg), workdir) is None
  assert tasks.label_names_change(_label_names(_pets_cfg(custom_dir)), workdir) is None
  shutil.rmtree(data_dir / "pets")
  _build(data_dir, "Pets", label(("cat", "dog", "horse", "ship")))
  here = f"label names of TFDS pets (data_dir {data_dir})"
  assert tasks.label_names_change(_label_names(cfg), workdir) == (
      f"label 2 is 'horse' in the {here} now, 'frog' when the run started ({record})"
  )
  reporting.write_classes(workdir, _label_names(_pets_cfg(custom_dir)))
  shutil.rmtree(data_dir / "pets")
  _build(data_dir, "Pets", label((*PETS, "horse")), label=lambda split, i: i % 5)
  assert tasks.label_names_change(_label_names(cfg), workdir) == (
      f"label 4 is 'horse' in the {here} now, no class in the label names of TFDS pets "
      f"(data_dir {custom_dir}) when the run started ({record})"
  )


@pytest.mark.parametrize("damage", ["moved", "no dataset_info", "dataset_info not JSON"])
def test_label_names_of_a_tfds_dataset_not_readable_are_none(custom_dir, tmp_path, damage):
  """Where the data moved since a run started, or its dataset_info is gone or broken, its names
  are not known: no label names (nothing to compare with the run's record), not an error."""
  data_dir = shutil.copytree(custom_dir, tmp_path / "data")
  cfg = _pets_cfg(str(data_dir))
  workdir = str(tmp_path / "run")
  reporting.write_classes(workdir, _label_names(cfg))
  info = os.path.join(data_dir, "pets", "1.0.0", "dataset_info.json")
  if damage == "moved":
    os.rename(data_dir, tmp_path / "elsewhere")
  elif damage == "no dataset_info":
    os.remove(info)
  else:
    with open(info, "w") as f:
      f.write("{")
  assert _label_names(cfg) is None
  assert tasks.label_names_change(_label_names(cfg), workdir) is None


def test_train_loader_full_recipe(tfds_dir):
  cfg = _cfg(tfds_dir)
  assert cfg.rand_augment and cfg.reprob > 0 and cfg.interpolation == "random"
  it = fd.create_loader(cfg, "train", 4, seed=0)
  batches = [next(it) for _ in range(fd.steps_per_epoch(cfg, 4))]  # one epoch
  for b in batches:
    assert set(b) == {"image", "label", "erase"}
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert b["erase"].shape == (4, 4) and (b["erase"][:, 2:] <= 32).all()
  labels = np.concatenate([b["label"] for b in batches])
  assert Counter(labels.tolist()) == {c: PER_CLASS for c in range(NUM_CLASSES)}
  assert it.stats() == {"bad": 0, "converted": 0}


def test_val_loader_matches_records(tfds_dir):
  cfg = _cfg(tfds_dir)
  src = sources.make_source(cfg, "val")
  it = fd.create_loader(cfg, "val", 4, seed=0)
  batches = [next(it) for _ in range(fd.num_eval_batches(cfg, 4))]
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  n = len(src)
  assert images.shape == (8, 32, 32, 3) and mask.tolist() == [True] * n + [False] * (8 - n)
  for i in range(n):  # source order; each image is the eval transform of its own record
    rec = src[i]
    assert labels[i] == _label(rec["key"])
    expected = transforms.eval_transform(transforms.decode(rec["encoded"])[0], cfg)
    np.testing.assert_array_equal(images[i], expected)
  assert not images[n:].any() and not labels[n:].any()


def test_config_json_records_a_tfds_data_dir_with_a_tilde_as_tfds_reads_it(tmp_path):
  """'~/tfds' (from Python or a config file) is read as $HOME/tfds; config.json recorded it as
  <current directory>/~/tfds, so eval.py and a resume said the data had moved."""
  config = fec_small.get_config()
  config.data.source, config.data.tfds_data_dir = "tfds", "~/tfds"
  reporting.write_config(str(tmp_path), config, fd.recorded_fields(config.data))
  recorded = reporting.read_config(str(tmp_path))["data"]["tfds_data_dir"]
  assert recorded == os.path.join(os.path.expanduser("~"), "tfds")
  config.data.tfds_data_dir = None  # from Python: TFDS's default, as '' (not recorded so)
  assert fd.recorded_fields(config.data) == {}


def test_training_runs_on_tfds(tfds_dir, compilation_cache, tmp_path, monkeypatch, capsys):
  """configs/fec_small.py (the full recipe) on the TFDS source, in-process, one loader worker
  process; float32 compute compiles about a third faster on CPU than bfloat16. The data lies in
  TFDS's default data_dir ($TFDS_DATA_DIR), which config.json records for later commands."""
  monkeypatch.setattr(tfds.core.constants, "DATA_DIR", tfds_dir)
  config = fec_small.get_config()
  config.data.source = "tfds"
  config.data.image_size, config.data.num_workers, config.model.dtype = 32, 1, "float32"
  config.global_batch_size, config.eval_batch_size = 4, 4
  config.max_steps, config.log_every_steps = 2, 1
  workdir = tmp_path / "w"
  assert train(config, workdir).step == 2
  records = reporting.read_metrics(str(workdir))
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["train_loss"]) for r in records)
  assert {"val_top1", "val_loss", "ema_val_top1"} <= records[-1].keys()
  assert saved_steps(workdir) == [2]
  assert reporting.read_config(str(workdir))["data"]["tfds_data_dir"] == tfds_dir
  cli.note_config_differences(config, str(workdir), given=True)  # '' reads the same folder
  assert capsys.readouterr().err == ""
  assert fd.recorded_fields(fec_small.get_config().data) == {}  # source folder: as given
