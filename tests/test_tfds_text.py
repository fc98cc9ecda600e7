"""TensorFlow Datasets loading: the offline text-file builder and tfds.load."""

import os
import socket

import pytest

from keras_matquant.data import load_bundled_paragraphs
from keras_matquant.data import load_text_dataset
from keras_matquant.data import text_files_builder


@pytest.fixture
def network_attempts(monkeypatch):
    """Block sockets in this process and record every attempt to connect."""
    attempts = []

    def reject_connection(*args, **kwargs):
        attempts.append(args[1:] if args else kwargs)
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", reject_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", reject_connection)
    monkeypatch.setattr(socket, "create_connection", reject_connection)
    monkeypatch.setattr(socket, "getaddrinfo", reject_connection)
    return attempts


def texts_of(dataset):
    return [text.decode("utf-8") for text in dataset.as_numpy_iterator()]


def split_texts(builder, split):
    rows = builder.as_dataset(split=split).as_numpy_iterator()
    return [row["text"].decode("utf-8") for row in rows]


@pytest.fixture(scope="module")
def bundled_data_dir(tmp_path_factory):
    """A data directory with the bundled text prepared once for the module."""
    data_dir = tmp_path_factory.mktemp("tfds")
    text_files_builder(data_dir=str(data_dir))
    return str(data_dir)


def test_bundled_builder_prepares_offline(network_attempts, tmp_path):
    builder = text_files_builder(data_dir=str(tmp_path))

    assert builder.info.splits["train"].num_examples == 3238
    assert builder.info.splits["heldout"].num_examples == 360
    assert split_texts(builder, "heldout") == load_bundled_paragraphs("heldout")
    assert split_texts(builder, "train") == load_bundled_paragraphs("train")
    assert network_attempts == []


def test_tfds_load_reads_bundled_text(network_attempts, bundled_data_dir):
    texts = load_text_dataset(
        "matquant_text_files/bundled", split="heldout", data_dir=bundled_data_dir
    )
    assert texts_of(texts) == load_bundled_paragraphs("heldout")
    assert network_attempts == []


def test_tfds_load_with_split_slice(bundled_data_dir):
    texts = load_text_dataset(
        "matquant_text_files/bundled:1.0.0",
        split="train[:3]",
        data_dir=bundled_data_dir,
    )
    assert texts_of(texts) == load_bundled_paragraphs("train")[:3]


def test_tfds_load_prepares_with_download(network_attempts, tmp_path):
    texts = load_text_dataset(
        "matquant_text_files/bundled",
        split="heldout[:2]",
        data_dir=str(tmp_path),
        download=True,
    )
    assert texts_of(texts) == load_bundled_paragraphs("heldout")[:2]
    assert network_attempts == []


def test_files_by_split(network_attempts, tmp_path):
    first = tmp_path / "first.txt"
    first.write_text("Alpha line.\n\n  \nBeta line.\n", encoding="utf-8")
    second = tmp_path / "second.txt"
    second.write_text("Gamma line with é.\n", encoding="utf-8")

    builder = text_files_builder(
        {"train": [first, second], "validation": str(second)},
        data_dir=str(tmp_path / "tfds"),
    )

    assert split_texts(builder, "train") == [
        "Alpha line.",
        "Beta line.",
        "Gamma line with é.",
    ]
    assert split_texts(builder, "validation") == ["Gamma line with é."]
    assert network_attempts == []


def test_single_file_is_train_split(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    builder = text_files_builder(path, data_dir=str(tmp_path / "tfds"))
    assert list(builder.info.splits) == ["train"]
    assert split_texts(builder, "train") == ["one", "two"]


def test_heldout_fraction_splits_each_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)), encoding="utf-8")

    builder = text_files_builder(
        [path], heldout_fraction=0.2, data_dir=str(tmp_path / "tfds")
    )

    assert split_texts(builder, "train") == [f"line {i}" for i in range(8)]
    assert split_texts(builder, "heldout") == ["line 8", "line 9"]


def test_changed_file_is_prepared_again(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old text\n", encoding="utf-8")
    data_dir = str(tmp_path / "tfds")
    old = text_files_builder(path, data_dir=data_dir)

    path.write_text("new, longer text\n", encoding="utf-8")
    os.utime(path, ns=(1, 1))
    new = text_files_builder(path, data_dir=data_dir)

    assert new.builder_config.name != old.builder_config.name
    assert split_texts(new, "train") == ["new, longer text"]


def test_unprepared_dataset_rejected(network_attempts, tmp_path):
    with pytest.raises(ValueError, match=f"'c4/en' is not prepared in {tmp_path}"):
        load_text_dataset("c4/en", data_dir=str(tmp_path))
    assert network_attempts == []


def test_unknown_dataset_rejected(network_attempts, tmp_path):
    with pytest.raises(ValueError, match="no dataset 'no_such_corpus_xyz'"):
        load_text_dataset("no_such_corpus_xyz", data_dir=str(tmp_path))
    assert network_attempts == []


def test_missing_text_feature_rejected(bundled_data_dir):
    with pytest.raises(ValueError, match=r"no feature 'body'.*\['text'\]"):
        load_text_dataset(
            "matquant_text_files/bundled",
            split="heldout",
            data_dir=bundled_data_dir,
            text_feature="body",
        )


def test_missing_file_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        text_files_builder([tmp_path / "absent.txt"], data_dir=str(tmp_path))


def test_blank_split_rejected(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Splits \['train'\] would have no text"):
        text_files_builder(path, data_dir=str(tmp_path))


def test_empty_heldout_split_rejected(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Splits \['heldout'\] would have no text"):
        text_files_builder([path], heldout_fraction=0.1, data_dir=str(tmp_path))


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, "0.1", True])
def test_invalid_heldout_fraction_rejected(tmp_path, fraction):
    path = tmp_path / "notes.txt"
    path.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="`heldout_fraction` must be a number in"):
        text_files_builder([path], heldout_fraction=fraction, data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "files, fraction, message",
    [
        ({"train": ["x.txt"]}, 0.1, "cannot be combined with a mapping"),
        (None, 0.1, "bundled text has a fixed held-out split"),
        (42, None, "Received: int"),
        ({}, None, "`files` is empty"),
        ({"my split": ["notes.txt"]}, None, "Split name 'my split' is invalid"),
        ({"train": []}, None, "Split 'train' has no files"),
    ],
)
def test_invalid_files_rejected(tmp_path, files, fraction, message):
    with pytest.raises(ValueError, match=message):
        text_files_builder(files, heldout_fraction=fraction, data_dir=str(tmp_path))
