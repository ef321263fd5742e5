"""Checkpoints that hold only what training changes.

The frozen encoder is hundreds of MB and identical in every checkpoint; keeping it out makes
checkpoints small and fast to write (resume every few steps is affordable). On load, every
trainable tensor must be present: a checkpoint of a different model is refused.
"""

from __future__ import annotations

from typing import Any


class TrainableOnlyCheckpoint:
    """LightningModule mixin: save trainable parameters and buffers, not frozen parameters."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.strict_loading = False  # the frozen tensors are absent on purpose; checked below

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[:3]}): "
                "it was written by a different model or configuration"
            )
