"""The `calibration:` / `evaluation:` recipe section: where a set of image+prompt records lives.

Kept free of heavy imports so the recipe can be validated without pyarrow or `datasets`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.config import Strict


class Columns(Strict):
    """Which source columns hold the image, the prompt and the reference answer.

    `answer: null` declares a set without reference answers (fine for calibration). In the
    folder format the image column defaults to `file_name` (the HF imagefolder convention).
    """

    image: str = Field("image", min_length=1, description="image column (folder format: `file_name`)")
    prompt: str = Field("prompt", min_length=1, description="question column")
    answer: str | None = Field("answer", min_length=1, description="reference answer column; null for none")

    @model_validator(mode="after")
    def _distinct(self) -> Columns:
        names = [n for n in (self.image, self.prompt, self.answer) if n is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"image, prompt and answer columns must differ, got {names}")
        return self


class DataConfig(Strict):
    """A set of records and how much of it to use; loading is `compress.data.load_dataset`."""

    source: str = Field(
        min_length=1,
        description="local folder (metadata.jsonl), parquet file or folder of them, a `datasets` "
        "save_to_disk folder, or hub:owner/name (online only)",
    )
    format: Literal["auto", "folder", "parquet", "datasets", "hub"] = Field("auto", description="how to read "
                                                                                    "`source`")
    split: str | None = Field(None, min_length=1, description="split of a DatasetDict / hub dataset")
    num_samples: int | None = Field(None, ge=1, description="take the first N (after optional shuffle)")
    shuffle: bool = Field(False, description="shuffle before `num_samples` (deterministic with `seed`)")
    seed: int = Field(0, description="shuffle seed")
    batch_size: int = Field(16, ge=1, description="batch size for calibration / evaluation")
    columns: Columns = Field(Columns(), description="column names")


class CalibrationConfig(DataConfig):
    """The calibration set, and what each block of a layer-by-layer calibration sees."""

    layer_inputs: Literal["original", "compressed"] = Field(
        "original", description="a block's calibration inputs come from the previous blocks as they were "
        "(original: the numbers of one whole-model calibration pass) or as the stage left them (compressed: the "
        "error propagates as at inference, as llm-compressor's sequential pipeline does); docs/scale.md has both "
        "measured")
