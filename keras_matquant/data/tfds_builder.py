"""A TensorFlow Datasets builder over local text files, one example a line.

Importing this module registers the builder with tfds as
`matquant_text_files`, so `tfds.load("matquant_text_files/bundled")`
prepares and reads the text bundled with this package. Preparing downloads
nothing: the builder reads the files it is given and writes tfds's own
record files under `data_dir`.
"""

import dataclasses
import hashlib
import json
import os

import tensorflow_datasets as tfds

from keras_matquant.data.text import HELDOUT_FRACTION
from keras_matquant.data.text import bundled_text_paths
from keras_matquant.data.text import split_paragraphs

BUILDER_NAME = "matquant_text_files"
BUNDLED_CONFIG_NAME = "bundled"
# Parts of a file that a split can take: all non-blank lines, or their train
# or held-out part (see `keras_matquant.data.text.split_paragraphs`).
FILE_PARTS = ("all", "train", "heldout")


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Builder config: the files and line ranges that make up each split.

    Attributes:
        sources: tuple of `(split, path, part)` triples. `part` is one of
            `FILE_PARTS`: `"all"` takes every non-blank line of the file,
            `"train"` and `"heldout"` take the parts that
            `split_paragraphs` returns for `heldout_fraction`.
        heldout_fraction: float in `[0, 1)`, the held-out share of each file
            for the `"train"` and `"heldout"` parts.
    """

    sources: tuple = ()
    heldout_fraction: float = HELDOUT_FRACTION


def _bundled_config():
    sources = tuple(
        (split, str(path), split)
        for split in ("train", "heldout")
        for path in bundled_text_paths()
    )
    return TextFilesConfig(
        name=BUNDLED_CONFIG_NAME,
        description=(
            "Wikipedia and New York Times paragraphs from SQuADShifts "
            "(CC BY 4.0), bundled with keras-matquant; the last 10% of each "
            "file is the held-out split."
        ),
        sources=sources,
    )


class MatquantTextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text files as a tfds dataset of `{"text": str}` examples.

    Each non-blank line of a file is one example, and examples keep the
    order of the files and lines. The `bundled` config has the package's
    text with splits `train` and `heldout`. Other configs come from
    `keras_matquant.data.text_files_builder`.

    Example:

    ```python
    builder = MatquantTextFiles(config="bundled", data_dir="/tmp/tfds")
    builder.download_and_prepare()
    texts = builder.as_dataset(split="heldout")
    ```
    """

    name = BUILDER_NAME
    # The bundled text is versioned with this builder: a change to the
    # bundled files needs a new version, or tfds serves the old records.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Text files, one example per non-blank line."}
    BUILDER_CONFIGS = [_bundled_config()]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            supervised_keys=None,
            # Keep file and line order, so the splits equal the lists that
            # `load_bundled_paragraphs` returns.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only: nothing is downloaded.
        splits = {}
        for split, path, part in self.builder_config.sources:
            splits.setdefault(split, []).append((path, part))
        return {
            split: self._generate_examples(sources)
            for split, sources in splits.items()
        }

    def _generate_examples(self, sources):
        fraction = self.builder_config.heldout_fraction
        for file_index, (path, part) in enumerate(sources):
            for line_index, line in enumerate(read_part(path, part, fraction)):
                yield f"{file_index}-{line_index}", {"text": line}


def read_part(path, part, heldout_fraction=HELDOUT_FRACTION):
    """Read the non-blank lines of one part of a UTF-8 text file.

    Args:
        path: str or path-like, the file.
        part: str, one of `FILE_PARTS`.
        heldout_fraction: float, the held-out share for `"train"` and
            `"heldout"`.

    Returns:
        A list of str, in file order, without line endings.

    Example:

    ```python
    lines = read_part("corpus.txt", "all")
    ```
    """
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    if part == "all":
        return [line for line in lines if line.strip()]
    return split_paragraphs(lines, part, heldout_fraction)


def config_name_for(sources, heldout_fraction):
    """Name a config after its files, sizes and modification times.

    tfds keeps prepared records per config name, so a file that changes
    gets a new name and is prepared again instead of read from old records.

    Args:
        sources: tuple of `(split, path, part)` with absolute paths.
        heldout_fraction: float.

    Returns:
        A str such as `"files_3f2a9c0d1e4b5a67"`.
    """
    listing = []
    for split, path, part in sources:
        status = os.stat(path)
        listing.append([split, path, part, status.st_size, status.st_mtime_ns])
    text = json.dumps([listing, heldout_fraction], sort_keys=True)
    return "files_" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
