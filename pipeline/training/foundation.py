"""Demo foundation models: the demo encoder pretrained on an RGB-only corpus (stage `foundation@<name>`).

No CPU can repeat SAM 2's pretraining, and a randomly initialised encoder has no RGB prior, so
nothing would separate what Stage 1 adds from what Stage 2 learns. A foundation model here is
a (narrow) timm encoder, randomly initialised and pretrained on the demo's foundation corpus
(RGB scenes only, mostly by day, from a seed no task split shares) the way SAM 2's trunk was:
Hiera is pretrained by masked image modelling (MAE) and SAM 2 then trains it with mask
supervision. Here both objectives share every step (`FoundationPretraining`): part of each
batch is masked and reconstructed (the MAE of pipeline/models/mae_decoder.py, which PSST's
warm-up reuses), the rest is segmented into the 7 demo classes. The encoder is then saved as a
timm-layout safetensors checkpoint whose metadata says what it is, and every later stage loads
it through the ordinary `backbone.weights: checkpoint` path, exactly as it would load Meta's
SAM 2 file; the mask token and both decoders are discarded (SAM 2's release has neither).

    <out>/model.safetensors   the encoder's timm state dict (metadata: description, architecture)
    <out>/foundation.json     architecture, corpus, training and held-out metrics per condition
    <out>/predictions.png     held-out RGB predictions of the pretraining decoder
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from safetensors.torch import save_file
from torch import Tensor

from pipeline.artifacts import PhaseOutputs, atomic_dir, write_json
from pipeline.config import section
from pipeline.data.loading import shard_keys, shard_urls
from pipeline.data.sharding import MANIFEST, read_manifest
from pipeline.data.types import RGB
from pipeline.methods.psst import mask_grid
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.models.backbone import DESCRIPTION_KEY, create_backbone
from pipeline.models.mae_decoder import MAEDecoder, reconstruction_loss
from pipeline.models.masking import MaskedEncoder, keyed_masks
from pipeline.models.task_losses import segmentation_loss
from pipeline.training.optim import ConfiguredOptimization, OptimSettings
from pipeline.training.task_data import SEGMENTATION, TaskSample, stream_encoders, task_eval_stream
from pipeline.training.tasks import (
    evaluate_model,
    figure_columns,
    fit_task_model,
    output_classes,
    save_prediction_figure,
)
from pipeline.training.trainer import (
    apply_memory_levers,
    config_hash,
    input_fingerprints,
    phase_steps,
    training_metrics,
)

CHECKPOINT = "model.safetensors"
INFO = "foundation.json"
PREDICTIONS_FIGURE = "predictions.png"
FORMAT = "xmodal-foundation"
CURVE = ("loss", "loss_segmentation", "loss_mae")
# Pretraining trains the whole encoder and its decoder: Stage 2's `full` method on one RGB stream.
PRETRAINING = MethodSettings(name="full", train_encoder=True, fusion={"kind": "concat"})


class FoundationPretraining(ConfiguredOptimization, L.LightningModule):
    """Segmentation and masked image modelling on RGB in one encoder pass per step.

    The first `mae_fraction` of each batch is masked (mask units replaced by the mask token) and
    its masked units reconstructed; the rest is seen whole and segmented.
    loss = CE(segmentation) + mae_weight * MSE(masked units, per-unit normalised targets).
    """

    def __init__(self, model: TaskModel, *, ignore_index: int, total_steps: int, optim: OptimSettings,
                 objective: Mapping[str, Any], seed: int):
        super().__init__()
        self.model = model
        self.masked = MaskedEncoder(model.backbone)
        self.mae_decoder = MAEDecoder(model.backbone.channels, dim=objective["decoder_dim"], unit=self.masked.unit)
        self.ignore_index = ignore_index
        self.total_steps = total_steps
        self.optim = optim
        self.mae_fraction, self.mae_weight = objective["mae_fraction"], objective["mae_weight"]
        self.mask_ratio = objective["mask_ratio"]
        self.seed = seed

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, target = batch[RGB], batch["target"]
        masked = round(self.mae_fraction * len(images))
        mask = keyed_masks(batch["key"], mask_grid(images.shape[-2:]), self.mask_ratio, self.seed, self.global_step,
                           images.device)
        mask[masked:] = False  # the segmented part of the batch is seen whole
        features = self.masked(images, mask)
        logits = self.model.decoder(self.model.fusion({RGB: [f[masked:] for f in features]}),
                                    out_size=tuple(images.shape[-2:]))
        seg = segmentation_loss(logits, target[masked:], self.ignore_index)
        mae, _ = reconstruction_loss(self.mae_decoder([f[:masked] for f in features]), images[:masked],
                                     mask[:masked], self.masked.unit)
        loss = seg + self.mae_weight * mae
        self.log_dict({"loss": loss, "loss_segmentation": seg, "loss_mae": mae}, prog_bar=True,
                      batch_size=len(images))
        return loss



def run_foundation(params: Mapping[str, Any], name: str, shard_dir: Path, outputs: PhaseOutputs,
                   run_dirs: Mapping[str, Path], progress: bool = True) -> dict[str, Any]:
    """Pretrain foundation `name` (config `foundations.<name>`) on its corpus; write `outputs.folder`."""
    cfg = section(params, f"foundations.{name}")
    train, evaluation_cfg = cfg["train"], cfg["eval"]
    architecture = dict(cfg["backbone"])
    manifest = read_manifest(shard_dir)
    class_names, ignore_index, palette = output_classes(manifest, SEGMENTATION)
    L.seed_everything(architecture.get("seed", 0), workers=True, verbose=False)
    backbone = apply_memory_levers(create_backbone(**architecture, weights="random"), params)
    model = TaskModel(backbone, [RGB], PRETRAINING, head=SEGMENTATION, num_classes=len(class_names),
                      decoder=cfg["decoder"])
    urls = shard_urls(shard_dir, train["split"])
    rgb_stats = (backbone.model.pretrained_cfg["mean"], backbone.model.pretrained_cfg["std"])
    encoders = stream_encoders([RGB], {}, manifest, urls, rgb_stats, 0, progress)
    tag = config_hash({"foundation": cfg, "trainer": section(params, "trainer"),
                       "inputs": input_fingerprints([shard_dir / MANIFEST])})
    seed = architecture.get("seed", 0)
    module = FoundationPretraining(model, ignore_index=ignore_index, total_steps=phase_steps(params, train),
                                   optim=OptimSettings(**train["optim"]), objective=cfg["objective"], seed=seed)
    trainer, curve = fit_task_model(params, module, encoders, urls, shard_keys(urls), train, head=SEGMENTATION,
                                    foreground=(), seed=seed, run_name=f"foundation/{name}", tag=tag,
                                    run_dirs=run_dirs, curve_keys=CURVE)
    classes = {"names": class_names, "ignore_index": ignore_index, "palette": palette}
    transform = TaskSample(encoders, head=SEGMENTATION, geometry=None)
    device = trainer.strategy.root_device  # this rank's device (Lightning hands the module back on the CPU)
    held_out = evaluate_model(
        model.eval().to(device), task_eval_stream(shard_urls(shard_dir, evaluation_cfg["split"]), transform),
        head=SEGMENTATION, classes=classes, batch_size=evaluation_cfg["batch_size"],
        group_pattern=evaluation_cfg.get("group_pattern"), encoders=encoders,
        figure_samples=evaluation_cfg["figure_samples"], num_workers=section(params, "loader.num_workers"),
        progress=progress, desc=f"evaluate foundation {name}")
    metrics: dict[str, Any] = {
        "foundation": name, "description": cfg["description"], "architecture": architecture,
        "parameters": sum(p.numel() for p in backbone.parameters()),
        "corpus": {"dataset": cfg["dataset"], "train_images": len(shard_keys(urls))},
        "objective": dict(cfg["objective"]),
        **training_metrics(trainer, curve, train["batch_size"], train["samples_per_epoch"], CURVE),
        "held_out": {"split": evaluation_cfg["split"], "overall": held_out.overall, "groups": held_out.groups},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    with atomic_dir(outputs.folder) as tmp:
        save_file(state, str(tmp / CHECKPOINT), metadata={
            DESCRIPTION_KEY: cfg["description"], "format": FORMAT, "architecture": json.dumps(architecture)})
        write_json(tmp / INFO, metrics)
        save_prediction_figure(held_out, figure_columns([RGB], SEGMENTATION), evaluation_cfg["figure_samples"],
                               tmp / PREDICTIONS_FIGURE)
    outputs.publish(metrics, curve.csv_text())
    return metrics
