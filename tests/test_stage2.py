"""Stage 2: what each method trains, streams with their own adapters, the label budget, and
finetune -> evaluate -> predict on a tiny demo (with a resumed interruption).

Random weights, sam2_hiera_tiny at 64 px and the `smoke` preset keep it fast on a CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.artifacts import PhaseOutputs, read_json
from pipeline.data.demo import generate_demo
from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.models.backbone import create_backbone
from pipeline.models.lora import IncompatibleLoraError, LoraSettings, add_lora, export_lora, load_lora, lora_provenance
from pipeline.models.task_losses import sod_loss
from pipeline.predict import predict_folder
from pipeline.training.optim import OptimSettings
from pipeline.training.task_data import TaskSample, label_subset, sample_group
from pipeline.training.task_module import TaskTraining
from pipeline.training.tasks import TASK_INFO, TRAINABLE, load_task_model, run_evaluate, run_finetune
from tests.conftest import Interrupt, crash_at_step, record_steps, smoke_params

SIZE = 64


@pytest.fixture(scope="module")
def params() -> dict:
    return smoke_params()


def make_lora(params: dict, out_dir: Path, seed: int = 0) -> Path:
    """A non-identity modality LoRA artifact for `params`' backbone (B drawn at random)."""
    backbone = create_backbone(**{**params["backbone"], "seed": seed})
    settings = LoraSettings(rank=4, alpha=8.0)
    peft = add_lora(backbone, settings)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    return export_lora(peft, out_dir, lora_provenance(backbone, settings, peft, modality={"name": "thermal"},
                                                      psst={"mode": "full"}))


@pytest.fixture(scope="module")
def lora_root(params, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    make_lora(params, root / "thermal")
    return root


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Shards and raw files of a tiny demo: 6 train, 3 test scenes (day, dusk, night) at 64 px."""
    tmp = tmp_path_factory.mktemp("demo")
    generate_demo(tmp / "raw", image_size=(SIZE, SIZE), num_train=6, num_val=0, num_test=3, num_pool=0,
                  progress=False)
    reader = build_reader({"reader": "paired", "root": str(tmp / "raw" / "paired"),
                           "modalities": ["rgb", "thermal", "depth"], "classes_file": "../classes.json"})
    shard_dataset(reader, tmp / "shards", name="demo", min_shards_per_split=2, progress=False)
    return tmp


def method(params: dict, name: str, **changes) -> MethodSettings:
    return MethodSettings.from_config({**params["methods"][name], **changes})


def build(params: dict, name: str, lora_root: Path | None = None, streams=("rgb", "thermal"), **changes) -> TaskModel:
    backbone = create_backbone(**params["backbone"])
    lora_dirs = {"thermal": lora_root / "thermal"} if lora_root else None
    return TaskModel(backbone, list(streams), method(params, name, **changes), head="segmentation", num_classes=7,
                     decoder={"embed_dim": 16}, lora_dirs=lora_dirs)


def trainable_groups(model: TaskModel) -> set[str]:
    """Which parts train: top-level module, with the encoder split into LoRA / base weights."""
    groups = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.startswith("backbone."):
                groups.add("encoder_lora" if ".lora_" in name else "encoder")
            else:
                groups.add(name.split(".")[0])
    return groups


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tp_mome", {"prompts", "fusion", "decoder"}),
        ("freeze", {"fusion", "decoder"}),
        ("full", {"encoder", "fusion", "decoder"}),
        ("lora", {"encoder_lora", "fusion", "decoder"}),
        ("vpt", {"prompts", "fusion", "decoder"}),
        ("iv_tuning", {"iv_tuning", "decoder"}),  # one prompted stream: nothing to fuse
        ("cola", {"cola", "fusion", "decoder"}),
    ],
)
def test_each_method_trains_exactly_its_parts_and_the_optimizer_sees_only_those(params, lora_root, name, expected):
    model = build(params, name, lora_root if name == "tp_mome" else None)
    assert trainable_groups(model) == expected
    if name == "tp_mome":  # the PSST modality LoRA is loaded, and frozen
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert lora and not any(p.requires_grad for p in lora)
    if name == "lora":  # one trainable task LoRA per stream
        names = {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if ".lora_A." in n}
        assert names == {"task_rgb", "task_thermal"}
    module = TaskTraining(model, head="segmentation", ignore_index=255, total_steps=4, optim=OptimSettings())
    optimizer = module.configure_optimizers()["optimizer"]
    optimised = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert optimised == model.parameter_counts()["trainable"]


def test_streams_run_their_own_adapter_over_one_shared_encoder(params, lora_root):
    model = build(params, "tp_mome", lora_root, prompts=0).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    plain = create_backbone(**params["backbone"]).eval()
    with_lora = create_backbone(**params["backbone"])
    load_lora(with_lora, lora_root / "thermal", "thermal")
    with torch.no_grad():
        rgb, thermal = model.encode("rgb", x), model.encode("thermal", x)
        for a, b in zip(rgb, plain(x), strict=True):
            torch.testing.assert_close(a, b)  # RGB: the plain encoder, no LoRA
        for a, b in zip(thermal, with_lora.eval()(x), strict=True):
            torch.testing.assert_close(a, b)  # thermal: its modality LoRA
        assert not torch.allclose(rgb[-1], thermal[-1])
    # one copy of the frozen encoder however many streams run
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.") and "lora_" not in n)
    assert encoder == sum(p.numel() for p in plain.parameters())


def test_a_lora_from_another_encoder_is_refused(params, tmp_path):
    make_lora(params, tmp_path / "thermal", seed=1)  # other random weights: other fingerprint
    with pytest.raises(IncompatibleLoraError, match="weights fingerprint"):
        build(params, "tp_mome", tmp_path)


@pytest.mark.parametrize("name", ["iv_tuning", "cola"])
def test_seed_methods_take_rgb_and_one_modality(params, name):
    model = build(params, name).eval()
    x, y = torch.randn(1, 3, SIZE, SIZE), torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert model({"rgb": x, "thermal": y}).shape == (1, 7, SIZE, SIZE)
    with pytest.raises(ValueError, match="takes streams"):
        build(params, name, streams=("thermal", "rgb"))


def test_sod_task_with_the_progressive_decoder(params):
    backbone = create_backbone(**params["backbone"])
    model = TaskModel(backbone, ["rgb", "thermal"], method(params, "iv_tuning"), head="sod", num_classes=1,
                      decoder={"architecture": "progressive", "embed_dim": 16}).eval()
    with torch.no_grad():
        assert model({"rgb": torch.randn(1, 3, SIZE, SIZE), "thermal": torch.randn(1, 3, SIZE, SIZE)}).shape == \
            (1, 1, SIZE, SIZE)


def test_deep_supervision_trains_each_decoder_output_with_the_task_loss(params):
    """VT5000 preset (IV-tuning's release): the loss is the SOD loss of the final map plus that of
    each of the three side outputs, at equal weight."""
    torch.manual_seed(0)
    backbone = create_backbone(**params["backbone"])
    model = TaskModel(backbone, ["rgb", "thermal"], method(params, "iv_tuning"), head="sod", num_classes=1,
                      decoder={"architecture": "progressive", "embed_dim": 16, "deep_supervision": True})
    module = TaskTraining(model, head="sod", ignore_index=255, total_steps=1, optim=OptimSettings()).train()
    batch = {"rgb": torch.randn(2, 3, SIZE, SIZE), "thermal": torch.randn(2, 3, SIZE, SIZE),
             "target": (torch.rand(2, 1, SIZE, SIZE) > 0.5).float()}
    module.log = lambda *args, **kwargs: None  # no trainer attached
    state = torch.random.get_rng_state()
    loss = module.training_step(batch, 0)
    torch.random.set_rng_state(state)  # the same dropout draws
    outputs = model({"rgb": batch["rgb"], "thermal": batch["thermal"]})
    assert len(outputs) == 4 and all(o.shape == (2, 1, SIZE, SIZE) for o in outputs)
    torch.testing.assert_close(loss, sum(sod_loss(o, batch["target"]) for o in outputs))
    assert loss > sod_loss(outputs[0], batch["target"])


def test_method_settings_are_checked(params):
    with pytest.raises(ValueError, match="not one of"):
        MethodSettings(name="magic")
    with pytest.raises(ValueError, match="one adapter"):
        method(params, "tp_mome", task_lora={"rank": 4})
    with pytest.raises(ValueError, match="at most one"):
        method(params, "cola", train_encoder=True)
    with pytest.raises(ValueError, match="needs the modality LoRA"):
        build(params, "tp_mome", None)


def test_label_budget_is_a_seeded_subset():
    keys = [f"k{i:02d}" for i in range(20)]
    chosen = label_subset(keys, 0.2, seed=3)
    assert len(chosen) == 4 and set(chosen) <= set(keys)
    assert label_subset(list(reversed(keys)), 0.2, seed=3) == chosen  # order of discovery does not matter
    assert label_subset(keys, 0.2, seed=4) != chosen
    assert label_subset(keys, 0.01, seed=0) and label_subset(keys, 1.0, seed=0) == keys
    with pytest.raises(ValueError, match="label_fraction"):
        label_subset(keys, 0.0, seed=0)


def test_sod_targets_and_groups():
    sample = {"key": "test__night_00002", "meta": {"name": "night_00002"},
              "label": torch.tensor([[0, 4], [5, 6]]), "rgb": torch.zeros(3, 2, 2)}
    from pipeline.training.psst_data import EncodeImage
    from pipeline.training.task_data import stream_encoding

    encode = EncodeImage(stream_encoding("rgb", {}, {"modalities": {}}))
    out = TaskSample({"rgb": encode}, head="sod", geometry=None, foreground=[4, 5])(sample)
    assert out["target"].tolist() == [[0, 1], [1, 0]]
    assert sample_group(sample["meta"], sample["key"], "^(?P<group>day|dusk|night)_") == "night"
    assert sample_group({}, "test__x", "^(day|night)_") is None


def tiny_task(params: dict, name: str = "rgbt_seg", **changes) -> dict:
    params = copy.deepcopy(params)
    params["tasks"][name]["train"].update(epochs=2, samples_per_epoch=4, batch_size=2, checkpoint_every_n_steps=1)
    params["tasks"][name].update(changes)
    return params


@pytest.mark.slow
def test_finetune_evaluate_predict_over_two_seeds(params, demo, lora_root, tmp_path):
    params = tiny_task(params, seeds=[0, 1], label_fraction=0.5)
    run_dirs = {"checkpoints": tmp_path / "ckpt", "logs": tmp_path / "logs"}
    shards, model_dir = demo / "shards", tmp_path / "model"
    metrics = run_finetune(params, "rgbt_seg", shards, lora_root, PhaseOutputs(model_dir, tmp_path / "train.json",
                                                                                 tmp_path / "loss.csv"),
                           run_dirs, progress=False)
    assert metrics["seeds"] == [0, 1] and set(metrics["runs"]) == {"0", "1"}
    assert metrics["steps"] == 4 and metrics["method"] == "tp_mome" and metrics["labeled_images"] == 3
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"]
    losses = [metrics["runs"][s]["loss_end"] for s in ("0", "1")]
    assert metrics["loss_end"] == pytest.approx(np.mean(losses)) and metrics["std"]["loss_end"] == pytest.approx(
        np.std(losses, ddof=1))
    assert read_json(tmp_path / "train.json") == metrics
    curve = (tmp_path / "loss.csv").read_text().splitlines()
    assert curve[0] == "seed,step,epoch,loss" and len(curve) == 1 + 2 * 4
    summary = read_json(model_dir / "summary.json")
    assert summary["seeds"] == [0, 1] and summary["modality_loras"]["thermal"]["psst_mode"] == "full"
    # each seed drew its own label subset (every method draws the same one for the same seed)
    subsets = [read_json(model_dir / f"seed{s}" / TASK_INFO)["label_keys"] for s in (0, 1)]
    assert len(subsets[0]) == len(subsets[1]) == 3 and subsets[0] != subsets[1]

    seed_dir = model_dir / "seed0"
    saved = load_file(str(seed_dir / TRAINABLE))  # trainable tensors (and BN statistics) only
    assert any(k.startswith("prompts.") for k in saved) and any(k.endswith("running_mean") for k in saved)
    assert not any(k.startswith("backbone.") for k in saved)
    assert sum(t.numel() for k, t in saved.items() if "running" not in k and "num_batches" not in k) == \
        metrics["parameters"]["trainable"]

    model, info, encoders = load_task_model(seed_dir)
    assert set(encoders) == {"rgb", "thermal"} and info["classes"]["names"][4] == "person" and info["seed"] == 0
    reloaded = {k: v for k, v in load_task_model(seed_dir)[0].state_dict().items()}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reloaded[key])

    evaluation = run_evaluate(params, "rgbt_seg", shards, model_dir, PhaseOutputs(tmp_path / "eval"), progress=False)
    assert evaluation["protocol"]["split"] == "test" and evaluation["protocol"]["flip"] is False
    assert set(evaluation["groups"]) == {"day", "dusk", "night"} and evaluation["seeds"] == [0, 1]
    per_seed = [read_json(tmp_path / "eval" / f"seed{s}" / "metrics.json")["overall"]["miou"] for s in (0, 1)]
    assert evaluation["overall"]["miou"] == pytest.approx(np.mean(per_seed))
    assert evaluation["overall_std"]["miou"] == pytest.approx(np.std(per_seed, ddof=1))
    assert evaluation["overall"]["pixels"] == 3 * SIZE * SIZE
    assert sum(g["pixels"] for g in evaluation["groups"].values()) == evaluation["overall"]["pixels"]
    assert 0.0 <= evaluation["overall"]["miou"] <= 1.0
    assert evaluation["weights_description"] == "random initialisation" and evaluation["is_random_init"]
    with Image.open(tmp_path / "eval" / "predictions.png") as figure:
        assert figure.width > 4 * SIZE  # rgb, thermal, ground truth, prediction
    # decoding in two loader processes (each reads one of the two test shards) changes neither
    # the scores nor which samples the figure shows
    again = run_evaluate({**params, "loader": {"num_workers": 2}}, "rgbt_seg", shards, model_dir,
                         PhaseOutputs(tmp_path / "eval_workers"), progress=False)
    assert again["runs"]["0"]["overall"] == evaluation["runs"]["0"]["overall"]
    assert again["groups"] == evaluation["groups"]
    figures = [(tmp_path / folder / "predictions.png").read_bytes() for folder in ("eval", "eval_workers")]
    assert figures[0] == figures[1]

    summary = predict_folder(seed_dir, {"reader": "paired", "root": str(demo / "raw" / "paired"),
                                        "modalities": ["rgb", "thermal"]}, tmp_path / "pred", splits=["test"],
                             progress=False)
    assert summary["written"] == 3 and summary["skipped"] == {}
    ids = np.array(Image.open(tmp_path / "pred" / "test__night_00002.png"))
    assert ids.shape == (SIZE, SIZE) and ids.max() < 7
    assert (tmp_path / "pred" / "test__night_00002_color.png").is_file()


@pytest.mark.slow
def test_interrupted_finetune_resumes_with_trainable_only_checkpoints(params, demo, lora_root, tmp_path, monkeypatch):
    params = tiny_task(params)
    run_dirs = {"checkpoints": tmp_path / "ckpt", "logs": tmp_path / "logs"}
    crash_at_step(monkeypatch, TaskTraining, 3)
    outputs = PhaseOutputs(tmp_path / "model")
    with pytest.raises(Interrupt):
        run_finetune(params, "rgbt_seg", demo / "shards", lora_root, outputs, run_dirs, progress=False)
    checkpoint = run_dirs["checkpoints"] / "finetune" / "rgbt_seg" / "seed0" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(".base_layer." in k or k.endswith("patch_embed.proj.weight") for k in state)
    assert not (tmp_path / "model").exists()

    monkeypatch.undo()
    steps_run = record_steps(monkeypatch, TaskTraining)
    metrics = run_finetune(params, "rgbt_seg", demo / "shards", lora_root, outputs, run_dirs, progress=False)
    assert steps_run == [3] and metrics["steps"] == 4
    assert not checkpoint.parent.exists()  # a finished run leaves no resume checkpoints behind

    steps_run.clear()  # a forced re-run of the finished stage trains afresh instead of "resuming"
    run_finetune(params, "rgbt_seg", demo / "shards", lora_root, outputs, run_dirs, progress=False)
    assert steps_run == [0, 1, 2, 3]


def test_seeds_must_be_a_list_of_distinct_integers(params, demo, lora_root, tmp_path):
    for seeds in ([], [0, 0], 3, [0.5]):
        with pytest.raises(ValueError, match=r"tasks.rgbt_seg.seeds must be"):
            run_finetune(tiny_task(params, seeds=seeds), "rgbt_seg", demo / "shards", lora_root,
                         PhaseOutputs(tmp_path / "model"), {}, progress=False)
