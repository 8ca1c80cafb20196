"""Layer-sequential calibration: a model's blocks run one at a time over the whole calibration set.

This package owns the order in which calibrated stages see a model. It finds the block sequences
(the outermost ModuleLists of Linear-holding blocks: vision encoder layers, decoder layers), captures
each sequence's inputs with one pass of the model in which earlier sequences replay their recorded
outputs and later ones are never reached, then hands every block — and, between sequences, the
modules outside any block (projector, lm_head) — to the stage as a `Unit`: a root module, the selected
names under it and a calibration loop over that root alone. After a block is handed back, its outputs
(from the compressed block, or recorded from the original one before the stage touched it, as
`calibration.layer_inputs` says) become the next block's inputs. Activations live in an
`ActivationStore` that keeps what fits its byte budget in memory and spills the rest to the stage's
work folder. The data loop and the layer loop are swapped, as in llm-compressor's sequential
pipeline: each block runs once per calibration batch per pass instead of the whole model once per
pass, and the same stage code runs whether a model fits in memory or not. A `Journal` saves each
finished unit, so a killed stage resumes at the unit it was working on.
"""

from compress.sequential.blocks import block_lists
from compress.sequential.inputs import calibration_batches
from compress.sequential.journal import Journal, merge, stage_key
from compress.sequential.runner import Sequencer, Unit
from compress.sequential.store import ActivationStore

__all__ = ["ActivationStore", "Journal", "Sequencer", "Unit", "block_lists", "calibration_batches", "merge",
           "stage_key"]
