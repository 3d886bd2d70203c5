"""One module per training objective; each contributes a pure loss function `loss(model, batch) -> (sum, count,
aux)` to the shared train loop."""

from jaxstages.stages.lm import lm_loss
from jaxstages.stages.sft import sft_per_sequence_loss

LOSSES = {"pretrain": lm_loss, "midtrain": lm_loss, "sft": lm_loss, "sft-per-sequence": sft_per_sequence_loss}
