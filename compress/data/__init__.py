"""Sets of image + prompt (+ reference answer) records for calibration and evaluation.

`load_dataset(DataConfig)` reads a local folder (metadata.jsonl + images), parquet, a `datasets`
save_to_disk folder, or (online only) a hub dataset, and returns the selected records with a
content hash. The bundled sets live in `calibration/` (see calibration/README.md).
"""

from compress.data.config import Columns, DataConfig
from compress.data.records import Dataset, Record, content_hash
from compress.data.sources import load_dataset

__all__ = ["Columns", "DataConfig", "Dataset", "Record", "content_hash", "load_dataset"]
