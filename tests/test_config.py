"""params.yaml stays the composition of conf/; overrides compose as `dvc exp run -S` does."""

from __future__ import annotations

import shutil

import pytest
import yaml

from pipeline.cli import main as xmodal
from pipeline.config import compose_params, load_params, section
from tests.conftest import REPO


def test_committed_params_equal_the_composition_of_conf():
    expected = compose_params(config_dir=REPO / "conf")
    actual = (REPO / "params.yaml").read_text()
    assert actual == expected, "params.yaml drifted from conf/: run `xmodal compose` and commit it"


def test_overrides_change_values_and_swap_groups():
    params = yaml.safe_load(compose_params(["demo.seed=3", "backbone=sam2_hiera_small"], REPO / "conf"))
    assert params["demo"]["seed"] == 3
    assert params["backbone"]["name"] == "sam2_hiera_small"
    added = yaml.safe_load(compose_params(["+dataset@datasets.hit_uav=hit_uav"], REPO / "conf"))
    assert added["datasets"]["hit_uav"]["reader"] == "folder"
    assert set(added["datasets"]) == set(params["datasets"]) | {"hit_uav"}


def test_conf_reads_nothing_from_the_runtime():
    # DVC resolves the composition once; env or hydra-runtime interpolations would freeze
    # whatever the composing machine had (design section 5).
    for path in (REPO / "conf").rglob("*.yaml"):
        text = path.read_text()
        assert "oc.env" not in text and "${hydra:" not in text, path


def test_compose_command_rewrites_params(tmp_path, monkeypatch):
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    xmodal(["compose", "demo.num_train=5"])
    assert load_params()["demo"]["num_train"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_section_errors_name_the_missing_key():
    params = {"datasets": {"demo": {"root": "x"}}}
    assert section(params, "datasets.demo.root") == "x"
    with pytest.raises(KeyError, match=r"'datasets.mfnet'.*have: \['demo'\]"):
        section(params, "datasets.mfnet")


EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_every_preset_composes_to_a_consistent_dag(experiment):
    """Each task names a known method and dataset, its streams are modalities (or rgb), and
    each modality's pool is a dataset: what the DAG's `foreach` stages will look up."""
    params = yaml.safe_load(compose_params([f"experiment={experiment}"] if experiment else [], REPO / "conf"))
    sets = {(lora["set"], lora["modality"]) for lora in params["loras"].values()}
    for name, task in params["tasks"].items():
        assert task["method"] in params["methods"], name
        assert task["dataset"] in params["datasets"], name
        assert set(task["streams"]) - {"rgb"} <= set(params["modalities"]), name
        assert params["methods"][task["method"]]["name"] == task["method"]
        assert {lora_set for lora_set, _ in sets} >= {task["lora_set"]}, name  # data/lora/<set> is built
        if params["methods"][task["method"]]["modality_loras"]:
            assert all((task["lora_set"], s) in sets for s in task["streams"] if s != "rgb"), name
        assert isinstance(task["seeds"], list) and task["seeds"], name
    for probed, dataset in params["probe"]["datasets"].items():  # a preset switches a probe off with null
        if probed in params["modalities"]:
            assert dataset is None or dataset in params["datasets"], f"probe.datasets.{probed}"
    for modality in params["modalities"].values():
        assert modality["dataset"] in params["datasets"]
        assert not modality.get("probe") or modality["probe"]["dataset"] in params["datasets"]
    for key, lora in params["loras"].items():
        assert lora["modality"] in params["modalities"] and lora["dataset"] in params["datasets"], key
    for foundation in params["foundations"].values():
        assert foundation["dataset"] in params["datasets"]
    if params["backbone"]["weights"] == "checkpoint" and params["backbone"]["checkpoint"].startswith("data/foundation/"):
        assert params["backbone"]["checkpoint"].split("/")[2] in params["foundations"]  # built by the DAG


def test_paper_presets_pick_their_papers_settings():
    swin = yaml.safe_load(compose_params(["experiment=iv_tuning_mfnet_swin_l"], REPO / "conf"))
    assert swin["backbone"]["name"] == "swin_large_patch4_window7_224.ms_in22k"  # ImageNet-22K, as the paper
    assert (swin["backbone"]["img_size"], swin["backbone"]["dynamic_img_size"]) == (512, True)  # crops and frames
    train = swin["tasks"]["mfnet_rgbt_seg"]["train"]  # SGD 1e-3 / 1e-2, 160k iterations at batch 2, train + val
    assert train["split"] == ["train", "val"] and train["batch_size"] == 2 and train["image_size"] == [512, 512]
    assert abs(train["epochs"] * train["samples_per_epoch"] / train["batch_size"] - 160_000) < 100
    assert train["optim"]["optimizer"] == {"_target_": "torch.optim.SGD", "lr": 1e-3, "momentum": 0.9,
                                           "weight_decay": 1e-2}
    assert swin["tasks"]["mfnet_rgbt_seg"]["eval"]["image_size"] is None  # MFNet's native 480x640
    assert swin["methods"]["iv_tuning"]["iv_tuning"] == {"d1": 8, "d2": 64, "d3": 8, "dropout": 0.1}
    assert list(swin["tasks"]) == ["mfnet_rgbt_seg"] and swin["tasks"]["mfnet_rgbt_seg"]["method"] == "iv_tuning"
    assert swin["tasks"]["mfnet_rgbt_seg"]["decoder"]["embed_dim"] == 256  # SegFormer-style head
    eva = yaml.safe_load(compose_params(["experiment=iv_tuning_mfnet_eva02_l"], REPO / "conf"))
    assert eva["backbone"] == {  # Merged-38M, patch 16, stochastic depth 0.2
        "name": "eva02_large_patch14_224.mim_m38m", "patch_size": 16, "drop_path_rate": 0.2, "weights": "pretrained",
        "checkpoint": None, "img_size": 512, "dynamic_img_size": True, "out_blocks": [7, 11, 15, 23], "seed": 0}
    eva_train = eva["tasks"]["mfnet_rgbt_seg"]["train"]  # the Swin-L recipe ("identical settings"), 512 crops
    assert eva_train["image_size"] == [512, 512]
    assert eva_train["optim"] == train["optim"] and eva_train["split"] == train["split"]
    sod = yaml.safe_load(compose_params(["experiment=iv_tuning_vt5000_swin_l"], REPO / "conf"))
    assert sod["tasks"]["vt5000_rgbt_sod"]["head"] == "sod" and sod["datasets"]["vt5000"]["reader"] == "vt5000"
    assert sod["tasks"]["vt5000_rgbt_sod"]["decoder"] | {"dropout": None} == {  # CPNet-style, all four outputs
        "architecture": "progressive", "embed_dim": 64, "deep_supervision": True, "dropout": None}
    assert sod["backbone"]["name"] == "swin_large_patch4_window12_384.ms_in22k"  # window 12 at 384, as released
    sod_train = sod["tasks"]["vt5000_rgbt_sod"]["train"]
    assert (sod_train["epochs"], sod_train["batch_size"], sod_train["image_size"]) == (200, 8, [384, 384])
    assert sod_train["optim"] | {"optimizer": None} == {
        "optimizer": None, "schedule": "step", "milestones": [0.5], "gamma": 0.1, "warmup_fraction": 0.0,
        "gradient_clip_val": 0.5}
    assert sod_train["optim"]["optimizer"] == {"_target_": "torch.optim.Adam", "lr": 5e-5, "weight_decay": 0.1}
    cola = yaml.safe_load(compose_params(["experiment=cola_mfnet"], REPO / "conf"))
    assert cola["methods"]["cola"]["cola"] == {"rank": 16, "alpha": 8.0, "s_init": 0.1, "reduction": [2, 4, 8, 16],
                                               "pool": "mean", "targets": ["q", "k", "v", "o", "fc1", "fc2"]}
    cola_optim = cola["tasks"]["mfnet_rgbt_seg"]["train"]["optim"]
    assert cola_optim["schedule"] == "poly" and set(cola_optim["param_groups"]) == {"model.decoder."}
    mfnet = yaml.safe_load(compose_params(["experiment=mfnet"], REPO / "conf"))
    assert mfnet["tasks"]["mfnet_rgbt_seg"]["train"]["optim"]["optimizer"]["lr"] == 3e-4  # the seed paper's AdamW


def test_real_data_presets_use_real_weights_and_no_demo_foundation():
    for experiment in ("mfnet", "cola_mfnet", "iv_tuning_mfnet_swin_l", "iv_tuning_vt5000_swin_l"):
        params = yaml.safe_load(compose_params([f"experiment={experiment}"], REPO / "conf"))
        assert params["foundations"] == {} and params["backbone"]["weights"] == "pretrained", experiment
        assert list(params["loras"]) == ["thermal"], experiment
    assert yaml.safe_load(compose_params(["experiment=mfnet"], REPO / "conf"))["backbone"]["name"] == \
        "sam2_hiera_base_plus"


def test_psst_ablation_preset_is_the_papers_rows_over_three_seeds():
    params = yaml.safe_load(compose_params(["experiment=psst_ablation"], REPO / "conf"))
    modes = {lora["set"]: lora["psst"]["mode"] for lora in params["loras"].values()}
    assert modes == {"none": "none", "mae": "mae", "mae_dino": "mae+dino", "full": "full"}
    rows: dict[str, set] = {}
    for task in params["tasks"].values():
        assert task["method"] == "tp_mome" and task["seeds"] == [0, 1, 2]
        rows.setdefault(task["lora_set"], set()).add((tuple(task["streams"]), task["head"]))
    assert set(rows) == set(modes) and len({frozenset(r) for r in rows.values()}) == 1  # every row, same tasks
    assert ("thermal",) in {streams for streams, _ in rows["full"]}  # the LoRA alone, no RGB to lean on
    schedules = {yaml.safe_dump({k: v for k, v in t.items() if k != "lora_set"}) for t in params["tasks"].values()
                 if tuple(t["streams"]) == ("rgb", "thermal") and t["head"] == "segmentation"}
    assert len(schedules) == 1  # rows differ in their LoRA set only


def test_label_efficiency_preset_sweeps_fractions_for_every_method():
    params = yaml.safe_load(compose_params(["experiment=label_efficiency"], REPO / "conf"))
    grid: dict[tuple, set] = {}
    for task in params["tasks"].values():
        assert task["seeds"] == [0, 1, 2] and task["streams"] == ["rgb", "thermal"]
        key = (task["method"], task["lora_set"] if params["methods"][task["method"]]["modality_loras"] else None)
        grid.setdefault(key, set()).add(task["label_fraction"])
    assert set(grid) == {("tp_mome", "full"), ("tp_mome", "none"), ("freeze", None), ("full", None),
                         ("lora", None), ("vpt", None)}
    assert all(fractions == {0.05, 0.1, 0.2, 0.5, 1.0} for fractions in grid.values())


def test_training_stages_start_through_the_launcher():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # trained by Lightning, or spread over the trainer's ranks (subset scoring, evaluation)
    for name in ("foundation", "psst_warmup", "psst_select", "psst_joint", "finetune", "evaluate"):
        assert stages[name]["do"]["cmd"].startswith("${launcher.command} -m stages." + name + " "), name
    for name in ("export_lora", "probe_lora"):  # one process
        assert stages[name]["do"]["cmd"].startswith("python -m stages."), name
    assert yaml.safe_load(compose_params([], REPO / "conf"))["launcher"] == {"command": "python"}
    params = yaml.safe_load(compose_params(["launcher=torchrun", "launcher.nproc_per_node=4"], REPO / "conf"))
    assert params["launcher"]["command"] == ("torchrun --nproc_per_node=4 --nnodes=1 --node_rank=0 "
                                             "--master_addr=127.0.0.1 --master_port=29500")
    slurm = yaml.safe_load(compose_params(["launcher=slurm"], REPO / "conf"))["launcher"]["command"]
    assert slurm == "srun --kill-on-bad-exit=1 python"
