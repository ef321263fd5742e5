"""The four PSST phases as plain functions of the composed parameters (what the stages call).

    run_warmup  shards -> warmup/   trainable.safetensors, encoding.json, metrics.json, loss.csv
    run_select  shards + warmup/ -> selection/   subset.json, scores.csv, histogram.csv, metrics.json
    run_joint   shards + warmup/ + selection/ -> joint/   trainable.safetensors, teacher.safetensors, ...
    run_export  shards + warmup/ + joint/ -> the modality LoRA artifact (peft folder + xmodal.json)

Each phase runs for one *Stage-1 run*, an entry of `loras` (`stage1_run`): a modality, the LoRA
set its artifact joins, and `psst` overrides merged over the global `psst` section. The PSST
mode switches the ablations: `none` trains nothing (the exported LoRA is the identity), `mae`
stops after the warm-up, `mae+dino` trains the joint phase without error weighting
(alpha = 0), `full` is PSST. Every phase writes its folder atomically, and the training
phases record how far the LoRA moved the encoder (`lora_update`: ||B A|| / ||W|| per stage)
and the MAE loss on a fixed probe before and after.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline.artifacts import PhaseOutputs, atomic_dir, load_trainable, read_json, save_trainable, write_json
from pipeline.config import merge, section
from pipeline.data.loading import TrainStream, shard_keys, shard_urls
from pipeline.data.modalities import ModalityEncoding, build_encoding
from pipeline.data.sharding import MANIFEST, file_sha256, read_manifest
from pipeline.distributed import gather_objects, launch_ranks
from pipeline.methods.psst import (
    MODES,
    HeadSettings,
    PSSTNetwork,
    mask_grid,
    probe_loss,
    reconstruction_scores,
    select_top_fraction,
)
from pipeline.models.backbone import create_backbone
from pipeline.models.lora import LoraSettings, export_lora, lora_provenance, lora_update_norms
from pipeline.models.masking import random_unit_mask, scoring_masks
from pipeline.training.callbacks import LossCurve
from pipeline.training.optim import OptimSettings
from pipeline.training.psst_data import (
    EncodeImage,
    MultiCrop,
    Normalization,
    augmented_stream,
    loader,
    measure_normalization,
    multicrop_stream,
    scoring_stream,
)
from pipeline.training.psst_module import JointSettings, JointTraining, MAEWarmup
from pipeline.training.trainer import (
    apply_memory_levers,
    config_hash,
    fit_resumable,
    input_fingerprints,
    phase_steps,
    training_metrics,
)

TRAINABLE = "trainable.safetensors"
TEACHER = "teacher.safetensors"
ENCODING = "encoding.json"


@dataclass(frozen=True)
class Stage1Run:
    """One entry of `loras`: the modality it adapts to, the LoRA set (folder) its artifact
    joins, and the PSST configuration it trains with (global `psst` + the entry's overrides)."""

    key: str
    modality: str
    set: str
    dataset: str  # the pool's shards, data/shards/<dataset> (what the DVC stages depend on)
    modality_cfg: Mapping[str, Any]
    psst: Mapping[str, Any]

    @property
    def mode(self) -> str:
        return self.psst["mode"]


def stage1_run(params: Mapping[str, Any], key: str) -> Stage1Run:
    """The Stage-1 run `loras.<key>`, checked: a known modality and PSST mode."""
    entry = section(params, f"loras.{key}")
    modality = entry["modality"]
    psst = merge(section(params, "psst"), entry.get("psst") or {})
    if psst["mode"] not in MODES:
        raise ValueError(f"loras.{key}: psst mode {psst['mode']!r} is not one of {', '.join(MODES)}")
    return Stage1Run(key, modality, entry["set"], entry["dataset"], section(params, f"modalities.{modality}"), psst)


def build_network(params: Mapping[str, Any], psst: Mapping[str, Any], state: Path | None = None) -> PSSTNetwork:
    """Backbone from `backbone`, LoRA/decoder/head from `psst`; optionally load trained tensors."""
    L.seed_everything(psst["seed"], workers=True, verbose=False)
    backbone = apply_memory_levers(create_backbone(**section(params, "backbone")), params)
    network = PSSTNetwork(backbone, LoraSettings.from_config(psst["lora"]), psst["decoder_dim"], HeadSettings(**psst["head"]))
    if state is not None:
        load_trainable(network, state)
    return network


def resolve_encoding(run: Stage1Run, shard_dir: Path) -> ModalityEncoding:
    """The modality's encoding with dataset-dependent parameters taken from the manifest."""
    config = run.modality_cfg
    stats = read_manifest(shard_dir)["modalities"].get(config["inputs"][0])
    if stats is None:
        raise ValueError(f"modalities.{run.modality}: {shard_dir / MANIFEST} has no {config['inputs'][0]!r} images")
    return build_encoding(run.modality, config, stats)


def load_encoder_input(warmup_dir: Path) -> EncodeImage:
    """The encoding + normalisation fixed by the warm-up, reused by every later phase."""
    saved = read_json(warmup_dir / ENCODING)
    encoding = ModalityEncoding(**saved["encoding"])
    return EncodeImage(encoding, Normalization(**{k: tuple(v) for k, v in saved["normalization"].items()}))


def _pool_urls(run: Stage1Run, shard_dir: Path) -> list[str]:
    return shard_urls(shard_dir, run.modality_cfg["split"])


def _fit(module: L.LightningModule, stream: TrainStream, *, params: Mapping[str, Any], run: Stage1Run, phase: str,
         epochs: int, batch_size: int, curve: LossCurve, run_dirs: Mapping[str, Path], inputs: list[Path]) -> L.Trainer:
    """Train `module` on `stream`; resume an interrupted run whose configuration and `inputs`
    (files it started from) were the same."""
    trainer_cfg = section(params, "trainer")
    tag = config_hash({"phase": phase, "modality": run.modality, "psst": run.psst, "backbone": params["backbone"],
                       "modality_cfg": run.modality_cfg, "trainer": trainer_cfg, "inputs": input_fingerprints(inputs)})
    return fit_resumable(
        module, stream, loader(stream, batch_size, section(params, "loader.num_workers")),
        trainer_cfg=trainer_cfg, logger_cfg=params.get("logger"), run_name=f"{phase}/{run.key}",
        run_dirs=run_dirs, tag=tag, epochs=epochs, batch_size=batch_size, curve=curve,
        checkpoint_every_n_steps=run.psst["checkpoint_every_n_steps"],
        channels_last=section(params, "memory.channels_last"),
    )


def run_warmup(params: Mapping[str, Any], lora: str, shard_dir: Path, outputs: PhaseOutputs,
               run_dirs: Mapping[str, Path], progress: bool = True) -> dict[str, Any]:
    """MAE warm-up of LoRA + mask token + decoder on the modality's unlabeled pool."""
    run = stage1_run(params, lora)
    psst = run.psst
    encoding = resolve_encoding(run, shard_dir)
    urls = _pool_urls(run, shard_dir)
    normalization = measure_normalization(urls, encoding, psst["normalization_images"], progress)
    network = build_network(params, psst)
    metrics: dict[str, Any] = {"phase": "warmup", "lora": lora, "set": run.set, "modality": run.modality,
                               "mode": run.mode, "trained": False, **network.backbone.provenance}
    curve = LossCurve(["loss_mae"])
    if run.mode != "none":
        cfg = psst["warmup"]
        encode = EncodeImage(encoding, normalization)
        probe = _probe(urls, encode, psst)
        probe_before = probe_loss(network, *probe, normalize_targets=psst["normalize_targets"])
        stream = augmented_stream(urls, encode, image_size=psst["image_size"],
                                  epoch_samples=cfg["samples_per_epoch"], seed=psst["seed"])
        module = MAEWarmup(network, total_steps=phase_steps(params, cfg),
                           optim=OptimSettings(**cfg["optim"]), mask_ratio=psst["mask_ratio"],
                           normalize_targets=psst["normalize_targets"], seed=psst["seed"])
        trainer = _fit(module, stream, params=params, run=run, phase="warmup", epochs=cfg["epochs"],
                       batch_size=cfg["batch_size"], curve=curve, run_dirs=run_dirs, inputs=[shard_dir / MANIFEST])
        metrics.update(training_metrics(trainer, curve, cfg["batch_size"], cfg["samples_per_epoch"], ["loss_mae"]))
        metrics["probe_loss_mae_before"] = round(probe_before, 6)
        metrics["probe_loss_mae_after"] = round(probe_loss(network, *probe, normalize_targets=psst["normalize_targets"]), 6)
    metrics["lora_update"] = lora_update_norms(network.peft, network.backbone)
    with atomic_dir(outputs.folder) as tmp:
        save_trainable(network, tmp / TRAINABLE)
        write_json(tmp / ENCODING, {"encoding": vars(encoding), "normalization": normalization.to_dict()})
        write_json(tmp / "metrics.json", metrics)
    outputs.publish(metrics, curve.csv_text())
    return metrics


def _probe(urls: list[str], encode: EncodeImage, psst: Mapping[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first `probe_images` pool images (resized) and `probe_masks` seeded masks."""
    items = list(islice(scoring_stream(urls, encode, image_size=psst["image_size"]), psst["probe_images"]))
    images = torch.stack([item["image"] for item in items])
    generator = torch.Generator().manual_seed(psst["seed"] + 1)
    masks = [random_unit_mask(len(images), mask_grid(psst["image_size"]), psst["mask_ratio"], generator)
             for _ in range(psst["probe_masks"])]
    return images, masks


def run_select(params: Mapping[str, Any], lora: str, shard_dir: Path, warmup_dir: Path,
               outputs: PhaseOutputs, progress: bool = True) -> dict[str, Any]:
    """Score every pool image by its MAE reconstruction variance; keep the top fraction.

    Runs on the trainer's processes and devices (`launch_ranks`): each rank scores its shards
    and rank 0 gathers the scores. An image's masks follow from its key (`scoring_masks`: keyed
    draws -1, -2, ..., never a training step's), so the scores do not depend on the number of ranks.
    """
    run = stage1_run(params, lora)
    mode, psst = run.mode, run.psst
    cfg = psst["select"]
    urls = _pool_urls(run, shard_dir)
    scores: dict[str, float] = {}
    if mode in ("none", "mae"):  # no joint phase follows: nothing to select for
        selected = shard_keys(urls)
        metrics: dict[str, Any] = {"mode": mode, "scored": False, "images": len(selected), "selected": len(selected)}
    else:
        device = launch_ranks(section(params, "trainer"))
        network = build_network(params, psst, warmup_dir / TRAINABLE).eval().to(device)
        encode = load_encoder_input(warmup_dir)
        grid = mask_grid(psst["image_size"])
        batches = loader(scoring_stream(urls, encode, image_size=psst["image_size"]), cfg["batch_size"],
                         section(params, "loader.num_workers"))
        for batch in tqdm(batches, desc=f"score {lora}", unit="batch", disable=not progress):
            masks = scoring_masks(batch["key"], grid, psst["mask_ratio"], psst["seed"], cfg["num_masks"], device)
            values = reconstruction_scores(network, batch["image"].to(device), masks, score=cfg["score"],
                                           normalize_targets=psst["normalize_targets"])
            scores.update(zip(batch["key"], values.tolist()))
        scores = {key: value for part in gather_objects(scores) for key, value in part.items()}
        selected = select_top_fraction(scores, cfg["fraction"])
        values = np.array(list(scores.values()))
        metrics = {
            "mode": mode, "scored": True, "score": cfg["score"], "images": len(scores), "selected": len(selected),
            "fraction": cfg["fraction"], "threshold": round(min(scores[k] for k in selected), 6),
            "score_min": round(float(values.min()), 6), "score_median": round(float(np.median(values)), 6),
            "score_max": round(float(values.max()), 6),
        }
    chosen = set(selected)
    with atomic_dir(outputs.folder) as tmp:
        write_json(tmp / "subset.json", {"mode": mode, "scored": bool(scores), "selected": selected,
                                         "scores": {k: round(v, 8) for k, v in sorted(scores.items())}})
        rows = [f"{k},{scores[k]:.8g},{int(k in chosen)}" for k in sorted(scores)]
        (tmp / "scores.csv").write_text("key,score,selected\n" + "".join(r + "\n" for r in rows))
        write_json(tmp / "metrics.json", metrics)
    outputs.publish(metrics, _histogram_csv(scores, chosen))
    return metrics


def _histogram_csv(scores: Mapping[str, float], chosen: set[str], bins: int = 20) -> str:
    """Score histogram of all images and of the selected ones, for `dvc plots`."""
    header = "score,images,selected\n"
    if not scores:
        return header
    keys = sorted(scores)
    values = np.array([scores[k] for k in keys])
    picked = np.array([k in chosen for k in keys])
    edges = np.histogram_bin_edges(values, bins=bins)
    all_counts, _ = np.histogram(values, edges)
    chosen_counts, _ = np.histogram(values[picked], edges)
    centres = (edges[:-1] + edges[1:]) / 2
    return header + "".join(f"{c:.6g},{a},{s}\n" for c, a, s in zip(centres, all_counts, chosen_counts))


def run_joint(params: Mapping[str, Any], lora: str, shard_dir: Path, warmup_dir: Path, selection_dir: Path,
              outputs: PhaseOutputs, run_dirs: Mapping[str, Path]) -> dict[str, Any]:
    """MAE + DINO self-distillation on the selected subset (`mae+dino`: alpha = 0)."""
    run = stage1_run(params, lora)
    mode, psst = run.mode, run.psst
    network = build_network(params, psst, warmup_dir / TRAINABLE)
    metrics: dict[str, Any] = {"phase": "joint", "lora": lora, "set": run.set, "modality": run.modality,
                               "mode": mode, "trained": False}
    curve = LossCurve(["loss", "loss_mae", "loss_image", "loss_patch"])
    teacher_state = None
    if mode in ("mae+dino", "full"):
        cfg = psst["joint"]
        urls = _pool_urls(run, shard_dir)
        encode = load_encoder_input(warmup_dir)
        probe = _probe(urls, encode, psst)
        probe_before = probe_loss(network, *probe, normalize_targets=psst["normalize_targets"])
        selected = read_json(selection_dir / "subset.json")["selected"]
        multicrop = MultiCrop(encode, global_size=psst["image_size"],
                              local_size=cfg["local_size"], global_crops=cfg["global_crops"],
                              local_crops=cfg["local_crops"], global_scale=cfg["global_scale"],
                              local_scale=cfg["local_scale"])
        samples = cfg["samples_per_epoch"]
        stream = multicrop_stream(urls, multicrop, epoch_samples=samples, keys=selected, seed=psst["seed"])
        joint = JointSettings(**{**cfg["loss"], "alpha": cfg["loss"]["alpha"] if mode == "full" else 0.0})
        module = JointTraining(network, joint=joint, total_steps=phase_steps(params, cfg),
                               optim=OptimSettings(**cfg["optim"]), mask_ratio=psst["mask_ratio"],
                               normalize_targets=psst["normalize_targets"], seed=psst["seed"])
        trainer = _fit(module, stream, params=params, run=run, phase="joint", epochs=cfg["epochs"],
                       batch_size=cfg["batch_size"], curve=curve, run_dirs=run_dirs,
                       inputs=[shard_dir / MANIFEST, warmup_dir / TRAINABLE, selection_dir / "subset.json"])
        metrics.update(training_metrics(trainer, curve, cfg["batch_size"], samples, curve.keys))
        metrics.update({"alpha": joint.alpha, "subset_size": len(selected),
                        "probe_loss_mae_before": round(probe_before, 6),
                        "probe_loss_mae_after": round(probe_loss(network, *probe,
                                                                 normalize_targets=psst["normalize_targets"]), 6)})
        teacher_state = module.teacher.tensors()
    metrics["lora_update"] = lora_update_norms(network.peft, network.backbone)
    with atomic_dir(outputs.folder) as tmp:
        save_trainable(network, tmp / TRAINABLE)
        if teacher_state is not None:
            save_file({k: v.contiguous() for k, v in teacher_state.items()}, str(tmp / TEACHER))
        write_json(tmp / "metrics.json", metrics)
    outputs.publish(metrics, curve.csv_text())
    return metrics


def run_export(params: Mapping[str, Any], lora: str, shard_dir: Path, warmup_dir: Path, joint_dir: Path,
               out_dir: Path) -> dict[str, Any]:
    """Write the frozen, reusable modality LoRA with its provenance."""
    run = stage1_run(params, lora)
    mode, psst = run.mode, run.psst
    source = psst["export_from"]
    if source not in ("student", "teacher"):
        raise ValueError(f"psst.export_from: {source!r} is not student or teacher")
    network = build_network(params, psst, joint_dir / TRAINABLE)
    if source == "teacher" and (joint_dir / TEACHER).is_file():
        _load_tensors(network, joint_dir / TEACHER)
    else:  # no joint phase ran (modes none, mae): there is no teacher, the student is what ships
        source = "student"
    provenance = lora_provenance(
        network.backbone, LoraSettings.from_config(psst["lora"]), network.peft,
        modality={"name": run.modality, **read_json(warmup_dir / ENCODING), "dataset": run.dataset},
        psst={"mode": mode, "run": lora, "set": run.set, "exported_from": source, "config": dict(psst),
              "config_hash": config_hash(psst)},
        shards={"manifest_sha256": file_sha256(shard_dir / MANIFEST)},
        losses={"warmup": read_json(warmup_dir / "metrics.json"), "joint": read_json(joint_dir / "metrics.json")},
        lora_update=lora_update_norms(network.peft, network.backbone),
    )
    export_lora(network.peft, out_dir, provenance)
    return provenance


def _load_tensors(network: PSSTNetwork, path: Path) -> None:
    """Overwrite some parameters (e.g. the teacher's EMA LoRA) by name."""
    params = dict(network.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(path)).items():
            params[name].copy_(tensor)
