"""PSST end to end on tiny demo data: the EMA teacher, scoring, the phases, modes (as Stage-1
runs of `loras`), how far the LoRA moves the encoder, resume, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from peft import PeftModel

from pipeline.artifacts import PhaseOutputs, read_json
from pipeline.data.demo import generate_demo
from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset
from pipeline.methods.psst import EMATeacher, mask_grid, reconstruction_scores, teacher_parameter_names
from pipeline.models.lora import read_provenance
from pipeline.models.masking import random_unit_mask
from pipeline.training import psst as phases
from pipeline.training.psst_module import JointTraining, MAEWarmup
from tests.conftest import Interrupt, crash_at_step, record_steps, smoke_params


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Shards of a tiny demo thermal pool (16-bit PNGs, 64x64)."""
    tmp = tmp_path_factory.mktemp("psst")
    generate_demo(tmp / "demo", image_size=(64, 64), num_train=1, num_val=1, num_test=1, num_pool=8, progress=False)
    reader = build_reader({"reader": "folder", "root": str(tmp / "demo" / "pool" / "thermal"), "modality": "thermal"})
    shard_dataset(reader, tmp / "shards", name="pool", progress=False)
    return tmp / "shards"


@pytest.fixture
def params() -> dict:
    return smoke_params()


@pytest.fixture
def run_dirs(tmp_path) -> dict[str, Path]:
    return {"checkpoints": tmp_path / "checkpoints", "logs": tmp_path / "logs"}


def test_teacher_averages_only_trainable_tensors_and_shares_the_frozen_encoder(params):
    network = phases.build_network(params, params["psst"])
    teacher = EMATeacher(network, teacher_parameter_names(network))
    named = dict(network.named_parameters())
    tracked = teacher_parameter_names(network)
    assert tracked and all(named[n].requires_grad for n in tracked)
    assert all(("lora_" in n) or n.startswith("head.") for n in tracked)
    # the teacher holds copies of the tracked tensors only: the frozen encoder exists once
    frozen = sum(p.numel() for p in network.parameters() if not p.requires_grad)
    assert sum(t.numel() for t in teacher.tensors().values()) == sum(named[n].numel() for n in tracked) < frozen / 10
    pointers = [p.data_ptr() for p in network.parameters()] + [t.data_ptr() for t in teacher.tensors().values()]
    assert len(pointers) == len(set(pointers))

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        student_out = network(images)
    for a, b in zip(teacher(network, images), student_out, strict=True):
        assert torch.equal(a, b)  # equal weights, equal outputs

    before = {n: t.clone() for n, t in teacher.tensors().items()}
    frozen_before = {n: p.clone() for n, p in named.items() if not p.requires_grad}
    with torch.no_grad():
        for p in network.parameters():
            if p.requires_grad:
                p.add_(1.0)
    teacher.update(network, momentum=0.75)
    for name, tensor in teacher.tensors().items():
        torch.testing.assert_close(tensor, 0.75 * before[name] + 0.25 * named[name])
    assert all(torch.equal(named[n], p) for n, p in frozen_before.items())
    with torch.no_grad():
        assert not torch.equal(teacher(network, images)[0], network(images)[0])


def test_teacher_targets_have_no_dropout_and_the_student_keeps_its_mode(params):
    params["psst"]["lora"]["dropout"] = 0.5  # LoRA dropout on: a student in train mode is stochastic
    network = phases.build_network(params, params["psst"]).train()
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_B" in name:
                p.normal_()  # off the identity, so the LoRA branch (and its dropout) matters
    teacher = EMATeacher(network, teacher_parameter_names(network))
    images = torch.randn(2, 3, 64, 64)
    first, second = teacher(network, images)[0], teacher(network, images)[0]
    assert torch.equal(first, second)
    assert all(m.training for m in network.modules())  # restored: the student still trains with dropout
    with torch.no_grad():
        assert not torch.equal(network(images)[0], network(images)[0])


def test_reconstruction_variance_score_by_hand(params):
    network = phases.build_network(params, params["psst"]).eval()
    images = torch.randn(3, 3, 64, 64)
    generator = torch.Generator().manual_seed(5)
    masks = [random_unit_mask(3, mask_grid((64, 64)), 0.5, generator) for _ in range(2)]
    scores = reconstruction_scores(network, images, masks)
    errors = [[], [], []]
    with torch.no_grad():
        for mask in masks:
            _, unit_errors, _ = network.reconstruct(images, mask)
            for b in range(3):
                errors[b] += unit_errors[b][mask[b]].tolist()
    expected = [torch.tensor(e).var(unbiased=True).item() for e in errors]
    assert scores.tolist() == pytest.approx(expected, rel=1e-4)


def test_gradients_reach_only_trainable_tensors(params):
    network = phases.build_network(params, params["psst"])
    images = torch.randn(2, 3, 64, 64)
    loss, _, _ = network.reconstruct(images, random_unit_mask(2, (2, 2), 0.5))
    loss.backward()
    for name, p in network.named_parameters():
        if p.requires_grad and (name.startswith("encoder") or name.startswith("decoder")):
            assert p.grad is not None, name
        if not p.requires_grad:
            assert p.grad is None, name


@pytest.mark.slow
def test_teacher_moves_once_per_optimizer_step_under_accumulation(params, pool, tmp_path, run_dirs, monkeypatch):
    phases.run_warmup(params, "thermal", pool, PhaseOutputs(tmp_path / "warmup"), run_dirs, progress=False)
    phases.run_select(params, "thermal", pool, tmp_path / "warmup", PhaseOutputs(tmp_path / "selection"), progress=False)
    params["trainer"]["accumulate_grad_batches"] = 2
    momenta: list[float] = []
    update = EMATeacher.update
    monkeypatch.setattr(EMATeacher, "update", lambda self, network, m: (momenta.append(m), update(self, network, m)))
    micro_batches = record_steps(monkeypatch, JointTraining)
    joint = phases.run_joint(params, "thermal", pool, tmp_path / "warmup", tmp_path / "selection",
                             PhaseOutputs(tmp_path / "joint"), run_dirs)
    assert joint["accumulate_grad_batches"] == 2 and joint["steps"] >= 1
    assert len(micro_batches) == 2 * joint["steps"] and len(momenta) == joint["steps"]
    assert momenta == sorted(momenta)  # the EMA schedule advances with the optimizer steps


@pytest.mark.slow
def test_phases_write_their_outputs_and_the_export_loads_with_peft(params, pool, tmp_path, run_dirs):
    warmup = phases.run_warmup(params, "thermal", pool, PhaseOutputs(tmp_path / "warmup", tmp_path / "m" / "w.json",
                                                                     tmp_path / "m" / "w.csv"), run_dirs, progress=False)
    assert warmup["trained"] and warmup["steps"] == 2 and warmup["effective_batch"] == 4
    assert warmup["probe_loss_mae_before"] > 0 and warmup["probe_loss_mae_after"] > 0
    assert warmup["lora"] == "thermal" and warmup["set"] == "default" and warmup["modality"] == "thermal"
    # the warm-up moved the LoRA off the identity, in every Hiera stage
    assert set(warmup["lora_update"]) == {"stage1", "stage2", "stage3", "stage4", "all"}
    assert all(value > 0 for value in warmup["lora_update"].values())
    assert read_json(tmp_path / "m" / "w.json") == warmup
    assert (tmp_path / "m" / "w.csv").read_text().splitlines()[0] == "step,epoch,loss_mae"

    selection = phases.run_select(params, "thermal", pool, tmp_path / "warmup", PhaseOutputs(tmp_path / "selection"),
                                  progress=False)
    subset = read_json(tmp_path / "selection" / "subset.json")
    assert selection["images"] == 8 and len(subset["selected"]) == 4 == selection["selected"]
    threshold = min(subset["scores"][k] for k in subset["selected"])
    assert all(v <= threshold for k, v in subset["scores"].items() if k not in subset["selected"])

    joint = phases.run_joint(params, "thermal", pool, tmp_path / "warmup", tmp_path / "selection",
                             PhaseOutputs(tmp_path / "joint"), run_dirs)
    assert joint["trained"] and joint["alpha"] == 1.0 and joint["subset_size"] == 4 and joint["steps"] == 2
    # the joint phase starts from the warm-up: its "before" is the warm-up's "after"
    assert joint["probe_loss_mae_before"] == pytest.approx(warmup["probe_loss_mae_after"], abs=1e-5)
    assert joint["lora_update"]["all"] != warmup["lora_update"]["all"]

    provenance = phases.run_export(params, "thermal", pool, tmp_path / "warmup", tmp_path / "joint", tmp_path / "lora")
    assert read_provenance(tmp_path / "lora") == provenance
    assert provenance["psst"]["mode"] == "full" and provenance["modality"]["encoding"]["encoding"] == "thermal"
    assert provenance["psst"]["set"] == "default" and provenance["lora_update"] == joint["lora_update"]
    assert len(provenance["modality"]["normalization"]["mean"]) == 3

    # the artifact is a plain peft adapter: it loads into a fresh timm model of the recorded
    # architecture (the demo's narrow Hiera: embed_dim 48) with the same weights
    encoder = provenance["backbone"]
    assert encoder["model_args"] == {"embed_dim": 48}
    network = phases.build_network(params, params["psst"], tmp_path / "joint" / phases.TRAINABLE).eval()
    fresh = timm.create_model(encoder["backbone"], pretrained=False, **encoder["model_args"])
    missing, unexpected = fresh.load_state_dict(_base_state(params), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "lora")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = network.backbone.model.forward_intermediates(x, intermediates_only=True)
        actual = loaded.base_model.model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, b)


def _base_state(params: dict) -> dict:
    """The frozen encoder's weights as a plain timm state dict (no LoRA)."""
    from pipeline.models.backbone import create_backbone

    return create_backbone(**params["backbone"]).model.state_dict()


def test_a_stage1_run_merges_its_psst_overrides_over_the_global_section(params):
    params["loras"]["thermal"]["psst"] = {"mode": "mae", "warmup": {"epochs": 3}}
    run = phases.stage1_run(params, "thermal")
    assert (run.key, run.modality, run.set, run.mode) == ("thermal", "thermal", "default", "mae")
    assert run.psst["warmup"]["epochs"] == 3 and run.psst["warmup"]["batch_size"] == params["psst"]["warmup"]["batch_size"]
    assert params["psst"]["mode"] == "full"  # the global section is untouched
    params["loras"]["thermal"]["psst"] = {"mode": "mae+dion"}
    with pytest.raises(ValueError, match=r"loras.thermal: psst mode 'mae\+dion'"):
        phases.stage1_run(params, "thermal")
    with pytest.raises(KeyError, match="loras.infrared"):
        phases.stage1_run(params, "infrared")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "mae"])
def test_ablation_modes(params, pool, tmp_path, run_dirs, mode):
    # one run's override, as conf/loras/psst_ablation.yaml; asks for the teacher, which these modes lack
    params["loras"]["thermal"]["psst"] = {"mode": mode, "export_from": "teacher"}
    warmup = phases.run_warmup(params, "thermal", pool, PhaseOutputs(tmp_path / "warmup"), run_dirs, progress=False)
    assert warmup["trained"] == (mode == "mae") and warmup["mode"] == mode
    assert (warmup["lora_update"]["all"] == 0.0) == (mode == "none")
    phases.run_select(params, "thermal", pool, tmp_path / "warmup", PhaseOutputs(tmp_path / "selection"), progress=False)
    assert read_json(tmp_path / "selection" / "subset.json")["scored"] is False
    joint = phases.run_joint(params, "thermal", pool, tmp_path / "warmup", tmp_path / "selection",
                             PhaseOutputs(tmp_path / "joint"), run_dirs)
    assert joint["trained"] is False
    assert (tmp_path / "joint" / phases.TRAINABLE).read_bytes() == (tmp_path / "warmup" / phases.TRAINABLE).read_bytes()
    provenance = phases.run_export(params, "thermal", pool, tmp_path / "warmup", tmp_path / "joint", tmp_path / "lora")
    assert provenance["psst"]["mode"] == mode and provenance["psst"]["exported_from"] == "student"
    network = phases.build_network(params, params["psst"], tmp_path / "joint" / phases.TRAINABLE).eval()
    b_weights = [p for n, p in network.named_parameters() if "lora_B" in n]
    assert all(bool((p == 0).all()) for p in b_weights) == (mode == "none")  # none: identity LoRA


@pytest.mark.slow
def test_interrupted_warmup_resumes_from_its_last_checkpoint(params, pool, tmp_path, run_dirs, monkeypatch):
    params["psst"]["warmup"].update(epochs=2, samples_per_epoch=8, batch_size=4)  # 4 steps in all
    crash_at_step(monkeypatch, MAEWarmup, 3)
    outputs = PhaseOutputs(tmp_path / "warmup", plot=tmp_path / "loss.csv")
    with pytest.raises(Interrupt):
        phases.run_warmup(params, "thermal", pool, outputs, run_dirs, progress=False)
    assert (run_dirs["checkpoints"] / "warmup" / "thermal" / "last.ckpt").is_file()
    assert not (tmp_path / "warmup").exists()  # nothing half-written

    monkeypatch.undo()
    steps_run = record_steps(monkeypatch, MAEWarmup)
    metrics = phases.run_warmup(params, "thermal", pool, outputs, run_dirs, progress=False)
    assert steps_run == [3] and metrics["steps"] == 4  # resumed, not restarted
    rows = (tmp_path / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4]  # the curve kept the steps before
    assert not (run_dirs["checkpoints"] / "warmup" / "thermal").exists()  # finished: nothing left to resume

    # a changed configuration does not resume from an interrupted run's checkpoint
    monkeypatch.undo()
    crash_at_step(monkeypatch, MAEWarmup, 3)
    with pytest.raises(Interrupt):
        phases.run_warmup(params, "thermal", pool, outputs, run_dirs, progress=False)
    monkeypatch.undo()
    params["psst"]["mask_ratio"] = 0.5
    steps_run = record_steps(monkeypatch, MAEWarmup)
    phases.run_warmup(params, "thermal", pool, PhaseOutputs(tmp_path / "warmup2"), run_dirs, progress=False)
    assert steps_run == [0, 1, 2, 3]
