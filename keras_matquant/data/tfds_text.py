"""Text datasets through TensorFlow Datasets: hub datasets and local files.

`load_text_dataset("c4/en")` reads a tfds dataset that is prepared in a
data directory (local or a bucket, as on TPU VMs). `text_files_builder`
turns local text files, by default the text bundled with this package, into
a tfds dataset without any network access. Both return `tf.data` datasets
of strings for `keras_matquant.data.packed_dataset`.
"""

import os
import re
from collections.abc import Mapping

from keras_matquant.data.text import HELDOUT_FRACTION


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "Loading text through TensorFlow Datasets needs the "
            "`tensorflow-datasets` package: pip install tensorflow-datasets"
        ) from error
    # Importing the builder module registers `matquant_text_files` with tfds.
    from keras_matquant.data import tfds_builder

    return tfds, tfds_builder


def load_text_dataset(
    name,
    split="train",
    data_dir=None,
    text_feature="text",
    download=False,
    shuffle_files=False,
):
    """Load one text feature of a TensorFlow Datasets dataset.

    Calls `tfds.load(name, split=split, data_dir=data_dir, ...)` and keeps
    the string feature `text_feature` of each example. With the default
    `download=False`, the dataset must already be prepared in `data_dir`:
    C4 (`"c4/en"`, about 800 GB) is prepared once with Apache Beam and then
    read from its directory or bucket. `"matquant_text_files/bundled"`, the
    text bundled with this package, is prepared offline from local files
    with `download=True`.

    Args:
        name: str, a tfds name with an optional config and version, such as
            `"c4/en"` or `"c4/en:3.1.0"`.
        split: str, a tfds split, e.g. `"train"`, `"validation[:1000]"`.
        data_dir: str or None, where tfds keeps prepared datasets. None uses
            tfds's default (`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`).
        text_feature: str, the feature holding the text. Defaults to
            `"text"`, the name C4 uses.
        download: bool, whether tfds may prepare the dataset when it is
            missing from `data_dir` (for hub datasets: download it).
        shuffle_files: bool, passed to `tfds.load`.

    Returns:
        A `tf.data.Dataset` of scalar `tf.string` texts.

    Raises:
        ValueError: if the dataset is not prepared in `data_dir` and
            `download` is False, the name is unknown to tfds, or the
            dataset has no string feature `text_feature`.

    Example:

    ```python
    texts = load_text_dataset(
        "c4/en", split="validation", data_dir="gs://my-bucket/tensorflow_datasets"
    )
    ```
    """
    tfds, _ = _import_tfds()
    try:
        dataset = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            shuffle_files=shuffle_files,
            try_gcs=False,
        )
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"TensorFlow Datasets has no dataset {name!r}. Check the name "
            "(e.g. 'c4/en'), or use `text_files_builder` for local text files."
        ) from error
    except AssertionError as error:
        # tfds asserts that a dataset it was not allowed to download is
        # prepared in `data_dir`.
        if "could not find data" not in str(error):
            raise
        location = data_dir or "tfds's default data directory"
        raise ValueError(
            f"Dataset {name!r} is not prepared in {location}. Prepare it "
            "there (`tfds build` on a machine that can reach its source, or "
            "copy the prepared folder), point `data_dir` at a directory or "
            "bucket that has it, or pass `download=True`."
        ) from error

    features = dataset.element_spec
    if not isinstance(features, Mapping) or text_feature not in features:
        available = sorted(features) if isinstance(features, Mapping) else []
        raise ValueError(
            f"Dataset {name!r} has no feature {text_feature!r}. Its features "
            f"are {available}; pass one of them as `text_feature`."
        )
    if features[text_feature].dtype.name != "string" or features[text_feature].shape.rank:
        raise ValueError(
            f"Feature {text_feature!r} of dataset {name!r} is "
            f"{features[text_feature]}, not a scalar string. Pass the name of "
            "a text feature as `text_feature`."
        )
    return dataset.map(lambda example: example[text_feature])


def _normalize_files(files, heldout_fraction):
    """Turn the `files` argument into `(split, path, part)` sources."""
    if heldout_fraction is not None:
        if isinstance(heldout_fraction, bool) or not isinstance(
            heldout_fraction, (int, float)
        ) or not 0.0 < heldout_fraction < 1.0:
            raise ValueError(
                "`heldout_fraction` must be a number in (0, 1), such as 0.1. "
                f"Received: {heldout_fraction!r}."
            )
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if isinstance(files, Mapping):
        if heldout_fraction is not None:
            raise ValueError(
                "`heldout_fraction` splits a list of files into 'train' and "
                "'heldout'; it cannot be combined with a mapping of split "
                f"names ({sorted(files)}). Pass a list of files, or drop "
                "`heldout_fraction`."
            )
        by_split = {split: paths for split, paths in files.items()}
        part_for = {split: "all" for split in by_split}
    elif isinstance(files, (list, tuple)):
        if heldout_fraction is None:
            by_split, part_for = {"train": files}, {"train": "all"}
        else:
            by_split = {"train": files, "heldout": files}
            part_for = {"train": "train", "heldout": "heldout"}
    else:
        raise ValueError(
            "`files` must be a path, a list of paths, or a dict mapping split "
            f"names to lists of paths. Received: {type(files).__name__}."
        )
    if not by_split:
        raise ValueError("`files` is empty. Give at least one text file.")

    sources = []
    for split, paths in by_split.items():
        if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ValueError(
                f"Split name {split!r} is invalid. Use letters, digits and "
                "underscores, such as 'train' or 'validation'."
            )
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not paths:
            raise ValueError(f"Split {split!r} has no files. Give at least one.")
        for path in paths:
            path = os.path.abspath(os.fspath(path))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Text file not found: {path}")
            sources.append((split, path, part_for[split]))
    return tuple(sources)


def _check_splits_have_text(sources, heldout_fraction, read_part):
    counts = {}
    for split, path, part in sources:
        counts[split] = counts.get(split, 0) + len(
            read_part(path, part, heldout_fraction)
        )
    empty = sorted(split for split, count in counts.items() if not count)
    if empty:
        raise ValueError(
            f"Splits {empty} would have no text: their files have no "
            "non-blank line in that part. Add text, or use a smaller "
            "`heldout_fraction`."
        )


def text_files_builder(files=None, heldout_fraction=None, data_dir=None):
    """Prepare local text files as a tfds dataset, without network access.

    Each non-blank line is one `{"text": ...}` example, in file order. The
    builder writes tfds's record files under `data_dir` the first time and
    reads them afterwards. A file whose size or modification time changed
    gets a new config name and is prepared again.

    Args:
        files: None for the text bundled with this package (splits `train`
            and `heldout`, the last 10% of each file). Otherwise a path, a
            list of paths (split `train`), or a dict mapping split names to
            lists of paths.
        heldout_fraction: None, or a float in `(0, 1)` with a list of
            files: each file's last `heldout_fraction` of lines forms split
            `heldout`, the rest split `train`.
        data_dir: str or None, where tfds writes prepared datasets. None uses
            tfds's default (`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`).

    Returns:
        A prepared `tfds` builder: `builder.as_dataset(split="train")` gives
        `{"text": tf.string}` examples, and `builder.info.splits` their
        counts.

    Raises:
        ValueError: if `files` or `heldout_fraction` is invalid, or a split
            would have no text.
        FileNotFoundError: if a file does not exist.

    Example:

    ```python
    builder = text_files_builder(["notes.txt"], heldout_fraction=0.1)
    texts = builder.as_dataset(split="train").map(lambda row: row["text"])
    ```
    """
    tfds, builder_module = _import_tfds()
    builder_class = builder_module.MatquantTextFiles
    if files is None:
        if heldout_fraction is not None:
            raise ValueError(
                "The bundled text has a fixed held-out split (10% of each "
                "file); `heldout_fraction` applies only to your own `files`."
            )
        config = builder_module.BUNDLED_CONFIG_NAME
    else:
        sources = _normalize_files(files, heldout_fraction)
        fraction = HELDOUT_FRACTION if heldout_fraction is None else heldout_fraction
        _check_splits_have_text(sources, fraction, builder_module.read_part)
        config = builder_module.TextFilesConfig(
            name=builder_module.config_name_for(sources, fraction),
            description="Local text files, one example per non-blank line.",
            sources=sources,
            heldout_fraction=fraction,
        )

    builder = builder_class(config=config, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder
