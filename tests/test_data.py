"""compress.data: every source kind, selection, hashing, errors, and the bundled shapes-vqa sets.

All sources are real files built in tmp_path from a few `compress.zoo.shapes` samples; the hub
is only exercised in offline mode, which must refuse before touching the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from compress.data import Columns, DataConfig, Dataset, Record, load_dataset
from compress.data.make_shapes import DEFAULT_OUT, png_bytes, write_set
from compress.errors import ConfigError
from compress.zoo import shapes

N = 6  # records in the small sets built per test
START = 0


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _samples(n: int = N, start: int = START) -> list[shapes.Sample]:
    return list(shapes.samples(start, n))


def _assert_matches(ds: Dataset, samples: list[shapes.Sample], with_answers: bool = True) -> None:
    assert len(ds) == len(samples)
    for rec, s in zip(ds.records, samples, strict=True):
        assert isinstance(rec, Record)
        assert rec.image.mode == "RGB"
        assert rec.image.tobytes() == s.image.tobytes()
        assert rec.prompt == s.question
        assert rec.answer == (s.answer if with_answers else None)


def _table(samples: list[shapes.Sample], image_as: str = "struct", **names: str) -> pa.Table:
    """A table in the layout `datasets` writes: image as {bytes, path} (or raw bytes / a path)."""
    img = names.get("image", "image")
    if image_as == "struct":
        images = [{"bytes": png_bytes(s.image), "path": None} for s in samples]
    else:
        images = [png_bytes(s.image) for s in samples]
    return pa.table({
        img: images,
        names.get("prompt", "prompt"): [s.question for s in samples],
        names.get("answer", "answer"): [s.answer for s in samples],
        "qtype": [s.qtype for s in samples],
    })


def _hf_dataset(samples: list[shapes.Sample]):  # -> datasets.Dataset
    import datasets

    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "qtype": datasets.Value("string")})
    return datasets.Dataset.from_dict({
        "image": [s.image for s in samples], "prompt": [s.question for s in samples],
        "answer": [s.answer for s in samples], "qtype": [s.qtype for s in samples],
    }, features=features)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_set(tmp_path / "set", START, N)


# --------------------------------------------------------------------------- source kinds


def test_folder(folder: Path) -> None:
    ds = load_dataset(DataConfig(source=str(folder)))
    _assert_matches(ds, _samples())
    assert ds.source == f"folder:{folder}"
    assert ds.records[0].meta == {"qtype": "color", "seed": 0, "short_answer": shapes.sample(0).short_answer}
    assert json.loads(json.dumps(ds.records[0].meta)) == ds.records[0].meta  # JSON as it is


def test_relative_source_resolves_against_base_dir(folder: Path) -> None:
    ds = load_dataset(DataConfig(source="set"), base_dir=folder.parent)
    assert ds.source == f"folder:{folder}" and len(ds) == N


def test_parquet_file(tmp_path: Path) -> None:
    pq.write_table(_table(_samples()), tmp_path / "d.parquet")
    ds = load_dataset(DataConfig(source=str(tmp_path / "d.parquet")))
    _assert_matches(ds, _samples())
    assert ds.source == f"parquet:{tmp_path / 'd.parquet'}"
    assert ds.records[3].meta == {"qtype": shapes.sample(3).qtype}


def test_parquet_raw_bytes_and_path_images(tmp_path: Path) -> None:
    samples = _samples()
    pq.write_table(_table(samples, image_as="bytes"), tmp_path / "raw.parquet")
    _assert_matches(load_dataset(DataConfig(source=str(tmp_path / "raw.parquet"))), samples)
    # path strings resolve against the parquet file's folder
    (tmp_path / "img").mkdir()
    for i, s in enumerate(samples):
        s.image.save(tmp_path / "img" / f"{i}.png")
    t = _table(samples).set_column(0, "image", pa.array([f"img/{i}.png" for i in range(N)]))
    pq.write_table(t, tmp_path / "paths.parquet")
    _assert_matches(load_dataset(DataConfig(source=str(tmp_path / "paths.parquet"))), samples)


def test_parquet_folder_in_sorted_order_and_split(tmp_path: Path) -> None:
    samples = _samples(10)
    root = tmp_path / "pq"
    (root / "data").mkdir(parents=True)
    pq.write_table(_table(samples[4:]), root / "data" / "train-00001-of-00002.parquet")
    pq.write_table(_table(samples[:4]), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(_table(samples[:2]), root / "data" / "test-00000-of-00001.parquet")
    ds = load_dataset(DataConfig(source=str(root), split="train"))
    _assert_matches(ds, samples)
    assert ds.source == f"parquet:{root}#train"
    _assert_matches(load_dataset(DataConfig(source=str(root), split="test")), samples[:2])
    # selection spans files and is taken before decoding; order follows the shuffled indices
    picked = load_dataset(DataConfig(source=str(root), split="train", shuffle=True, seed=3, num_samples=5))
    full = load_dataset(DataConfig(source=str(root), split="train", shuffle=True, seed=3))
    assert [r.prompt for r in picked.records] == [r.prompt for r in full.records[:5]]
    with pytest.raises(ConfigError, match=r"no files for split 'dev'.*train-00000-of-00002\.parquet"):
        load_dataset(DataConfig(source=str(root), split="dev"))


def test_datasets_save_to_disk(tmp_path: Path) -> None:
    samples = _samples()
    _hf_dataset(samples).save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset(DataConfig(source=str(tmp_path / "hf")))
    _assert_matches(ds, samples)
    assert ds.source == f"datasets:{tmp_path / 'hf'}"
    assert ds.records[1].meta == {"qtype": samples[1].qtype}


def test_datasetdict_split_selection(tmp_path: Path) -> None:
    import datasets

    samples = _samples(8)
    dd = datasets.DatasetDict({"train": _hf_dataset(samples[:5]), "test": _hf_dataset(samples[5:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    ds = load_dataset(DataConfig(source=str(tmp_path / "dd"), split="test"))
    _assert_matches(ds, samples[5:])
    assert ds.source == f"datasets:{tmp_path / 'dd'}#test"
    with pytest.raises(ConfigError, match=r"DatasetDict with splits \['train', 'test'\]; choose one"):
        load_dataset(DataConfig(source=str(tmp_path / "dd")))
    with pytest.raises(ConfigError, match=r"no split 'dev'; available splits: \['train', 'test'\]"):
        load_dataset(DataConfig(source=str(tmp_path / "dd"), split="dev"))


@pytest.mark.parametrize("var", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv(var, "1")
    with pytest.raises(ConfigError, match=rf"hub:owner/name: the hub is offline \({var} set\).*local copy"):
        load_dataset(DataConfig(source="hub:owner/name", split="train"))
    with pytest.raises(ConfigError, match="the hub is offline"):
        load_dataset(DataConfig(source="owner/name", format="hub"))


def test_folder_splits(tmp_path: Path) -> None:
    samples = _samples(5)
    write_set(tmp_path / "r" / "train", 0, 3)
    write_set(tmp_path / "r" / "test", 3, 2)
    ds = load_dataset(DataConfig(source=str(tmp_path / "r"), split="test"))
    _assert_matches(ds, samples[3:])
    assert ds.source == f"folder:{tmp_path / 'r' / 'test'}"
    with pytest.raises(ConfigError, match=r"has no split 'dev' .*splits found: \['test', 'train'\]"):
        load_dataset(DataConfig(source=str(tmp_path / "r"), split="dev"))
    with pytest.raises(ConfigError, match=r"has splits \['test', 'train'\] .*choose one with split:"):
        load_dataset(DataConfig(source=str(tmp_path / "r")))


# --------------------------------------------------------------------------- columns and selection


def test_column_mapping(tmp_path: Path) -> None:
    samples = _samples()
    table = _table(samples, image="picture", prompt="question", answer="label")
    pq.write_table(table, tmp_path / "m.parquet")
    cols = Columns(image="picture", prompt="question", answer="label")
    _assert_matches(load_dataset(DataConfig(source=str(tmp_path / "m.parquet"), columns=cols)), samples)
    # answer: null -> no reference answers; the unused column is kept as meta
    ds = load_dataset(DataConfig(source=str(tmp_path / "m.parquet"),
                                 columns={"image": "picture", "prompt": "question", "answer": None}))
    _assert_matches(ds, samples, with_answers=False)
    assert ds.records[0].meta["label"] == samples[0].answer


def test_folder_column_mapping(tmp_path: Path) -> None:
    root = tmp_path / "f"
    (root / "pics").mkdir(parents=True)
    samples = _samples(3)
    with (root / "metadata.jsonl").open("w") as f:
        for i, s in enumerate(samples):
            s.image.save(root / "pics" / f"{i}.png")
            f.write(json.dumps({"img": f"pics/{i}.png", "q": s.question, "a": s.answer}) + "\n")
    cfg = DataConfig(source=str(root), columns={"image": "img", "prompt": "q", "answer": "a"})
    _assert_matches(load_dataset(cfg), samples)


def test_num_samples_and_shuffle_are_deterministic(tmp_path: Path) -> None:
    root = write_set(tmp_path / "s", START, 12)
    prompts = lambda **kw: [r.meta["seed"] for r in load_dataset(DataConfig(source=str(root), **kw)).records]  # noqa: E731
    assert prompts(num_samples=4) == [0, 1, 2, 3]
    a = prompts(shuffle=True, seed=7)
    assert sorted(a) == list(range(12)) and a != list(range(12))
    assert prompts(shuffle=True, seed=7) == a
    assert prompts(shuffle=True, seed=7, num_samples=5) == a[:5]
    assert prompts(shuffle=True, seed=8) != a
    assert prompts(num_samples=100) == list(range(12))  # fewer than asked: all of them


def test_batches(folder: Path) -> None:
    ds = load_dataset(DataConfig(source=str(folder)))
    batches = list(ds.batches(4))
    assert [len(b) for b in batches] == [4, 2]
    assert [r for b in batches for r in b] == ds.records
    with pytest.raises(ValueError):
        next(ds.batches(0))


def test_hash_stability(folder: Path, tmp_path: Path) -> None:
    h = load_dataset(DataConfig(source=str(folder))).sha256
    assert len(h) == 64
    assert load_dataset(DataConfig(source=str(folder))).sha256 == h
    assert load_dataset(DataConfig(source=str(folder), num_samples=5)).sha256 != h
    assert load_dataset(DataConfig(source=str(folder), shuffle=True)).sha256 != h
    # the hash covers decoded pixels, not file bytes: the same content as parquet hashes the same
    pq.write_table(_table(_samples()), tmp_path / "same.parquet")
    assert load_dataset(DataConfig(source=str(tmp_path / "same.parquet"))).sha256 == h
    # a changed answer changes it
    meta = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[2]["answer"] = rows[2]["answer"] + "x"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_dataset(DataConfig(source=str(folder))).sha256 != h
    # ...and so does a changed image
    write_set(folder, START, N)
    assert load_dataset(DataConfig(source=str(folder))).sha256 == h
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "images" / "000004.png")
    assert load_dataset(DataConfig(source=str(folder))).sha256 != h


# --------------------------------------------------------------------------- errors


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data source not found: .*nope .*relative paths resolve against"):
        load_dataset(DataConfig(source="nope"), base_dir=tmp_path)


def test_unknown_source_kind(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"cannot tell what kind of .*empty is; expected .*metadata"):
        load_dataset(DataConfig(source=str(tmp_path / "empty")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"x\.csv is a file but not \.parquet"):
        load_dataset(DataConfig(source=str(tmp_path / "x.csv")))


def test_missing_column_lists_available(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metadata\.jsonl:1: missing column\(s\) \['question'\]; available "
                       r"columns: \['file_name', 'prompt', 'answer', 'short_answer', 'qtype', 'seed'\]"):
        load_dataset(DataConfig(source=str(folder), columns={"prompt": "question"}))
    t = _table(_samples(2)).drop_columns(["answer"])
    pq.write_table(t, tmp_path / "noans.parquet")
    with pytest.raises(ConfigError, match=r"noans\.parquet: missing column\(s\) \['answer'\]; available "
                       r"columns: \['image', 'prompt', 'qtype'\].*answer: null"):
        load_dataset(DataConfig(source=str(tmp_path / "noans.parquet")))
    _hf_dataset(_samples(2)).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"datasets:.*hf: missing column\(s\) \['pic'\]; available"):
        load_dataset(DataConfig(source=str(tmp_path / "hf"), columns={"image": "pic"}))


def test_corrupt_image(folder: Path, tmp_path: Path) -> None:
    (folder / "images" / "000003.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"metadata\.jsonl:4 \(.*000003\.png\): unreadable or corrupt"):
        load_dataset(DataConfig(source=str(folder)))
    # only selected rows are decoded: the first three load, whole
    _assert_matches(load_dataset(DataConfig(source=str(folder), num_samples=3)), _samples(3))
    (folder / "images" / "000003.png").unlink()
    with pytest.raises(ConfigError, match=r"metadata\.jsonl:4: image file not found: .*000003\.png"):
        load_dataset(DataConfig(source=str(folder)))
    t = _table(_samples(3), image_as="bytes")
    images = t.column("image").to_pylist()
    images[1] = png_bytes(_samples(1)[0].image)[:60]  # truncated
    pq.write_table(t.set_column(0, "image", pa.array(images)), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match=r"bad\.parquet row 1: unreadable or corrupt image"):
        load_dataset(DataConfig(source=str(tmp_path / "bad.parquet")))


def test_bad_metadata_line(folder: Path) -> None:
    with (folder / "metadata.jsonl").open("a") as f:
        f.write("{oops\n")
    with pytest.raises(ConfigError, match=rf"metadata\.jsonl:{N + 1}: not valid JSON"):
        load_dataset(DataConfig(source=str(folder)))


def test_empty_set(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "metadata.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"calibration/evaluation set is empty: folder:.*f has no records"):
        load_dataset(DataConfig(source=str(tmp_path / "f")))
    pq.write_table(_table([]), tmp_path / "e.parquet")
    with pytest.raises(ConfigError, match=r"calibration/evaluation set is empty: parquet:.*e\.parquet"):
        load_dataset(DataConfig(source=str(tmp_path / "e.parquet")))


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError):
        DataConfig(source="x", nmu_samples=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        DataConfig(source="x", num_samples=0)
    with pytest.raises(ValidationError):
        DataConfig(source="x", format="csv")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Columns(image="x", prompt="x")
    assert DataConfig(source="x").columns == Columns()


# --------------------------------------------------------------------------- bundled sets


def test_make_shapes_is_byte_deterministic(tmp_path: Path) -> None:
    a = write_set(tmp_path / "a", 40, 5)
    b = write_set(tmp_path / "b", 40, 5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.mark.parametrize(("name", "seeds"), [("eval", shapes.EVAL_SEEDS), ("calib", shapes.CALIB_SEEDS),
                                           ("distill", shapes.DISTILL_SEEDS)])
def test_bundled_sets_match_regeneration(name: str, seeds: tuple[int, int]) -> None:
    """The committed files are exactly what compress.zoo.shapes generates, so they cannot drift."""
    start, count = seeds
    ds = load_dataset(DataConfig(source=str(DEFAULT_OUT / name)))
    assert len(ds) == count
    assert [r.meta["seed"] for r in ds.records] == list(range(start, start + count))
    _assert_matches(ds, list(shapes.samples(start, count)))
    assert [r.meta["qtype"] for r in ds.records[:5]] == list(shapes.QUESTION_TYPES)
    assert start + count <= shapes.TRAIN_SEEDS[0]  # held out from training
