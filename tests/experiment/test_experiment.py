"""sparsekern.experiment: config schema and presets, CLI, and a tiny end-to-end run with resume."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from sparsekern.__main__ import main as sparsekern_main
from sparsekern.experiment import COLUMNS, ConfigError, Runner, load_config, preset_names
from sparsekern.experiment.config import ExperimentConfig, to_dict
from sparsekern.experiment.store import ResultStore, load_checkpoint

# A run small enough for CI: 256 training images, 32 attack images, a few steps of everything.
TINY = [
    "name=tiny", "data.train_size=256", "data.test_size=128",
    "grid.models=[lenet-300-100]", "grid.methods=[magnitude, dns]", "grid.sparsities=[0, 0.8]",
    "train.epochs=1", "train.batch_size=64", "finetune.epochs=1", "finetune.batch_size=64",
    "eval.images=32", "eval.batch_size=32", "eval.fgsm.eps=[0.1, 0.3]", "eval.pgd.eps=[0.3]",
    "eval.pgd.steps=2", "eval.deepfool.steps=3", "eval.cw.enabled=true", "eval.cw.images=8",
    "eval.cw.steps=3", "eval.cw.binary_search_steps=1",
]
# Rows of one LeNet-300-100 cell: clean, FGSM x2, PGD x1, DeepFool L2 + Linf, C&W,
# weight sparsity of fc1-fc3 + total, activation sparsity of the shared ReLU's two calls.
ROWS_PER_CELL = 1 + 2 + 1 + 2 + 1 + 4 + 2


class CountingRunner(Runner):
    """Counts the expensive steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained, self.cells_run = [], []

    def train_dense(self, model_name, seed):
        self.trained.append((model_name, seed))
        return super().train_dense(model_name, seed)

    def run_cell(self, model_name, method, block, sparsity, seed, dense_state):
        self.cells_run.append((method, sparsity))
        return super().run_cell(model_name, method, block, sparsity, seed, dense_state)


def run(out, overrides=()):
    runner = CountingRunner(load_config(None, TINY + list(overrides)), out, progress=False,
                            log=lambda s: None)
    return runner, runner.run()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    runner, result = run(out)
    return out, runner, result


# ---- the end-to-end run ----------------------------------------------------------------------
def test_run_writes_every_file(tiny_run):
    out, runner, result = tiny_run
    for name in ("config.yaml", "results.jsonl", "results.csv", "env.json", "summary.txt",
                 "plots/lenet-300-100.png", "checkpoints/dense-lenet-300-100-seed0.pt"):
        assert (out / name).is_file(), name
    assert (out / "plots/lenet-300-100.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(out / "config.yaml") == runner.cfg  # config.yaml round trips
    env = json.loads((out / "env.json").read_text())
    for key in ("python", "torch", "git_commit", "device", "cpu_isa"):
        assert key in env
    # 4 cells; the dense model is trained once, the 0% cell runs once (DNS reuses it)
    assert runner.trained == [("lenet-300-100", 0)]
    assert sorted(runner.cells_run) == [("dns", 0.8), ("magnitude", 0.0), ("magnitude", 0.8)]
    assert result["ran"] == 4 and result["skipped"] == 0
    assert len(list((out / "checkpoints/cells").glob("*.pt"))) == 3


def test_results_rows_and_columns(tiny_run):
    out, _, _ = tiny_run
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    jsonl = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(jsonl) == 4 * ROWS_PER_CELL
    cells = {(r["method"], r["sparsity"]) for r in jsonl}
    assert cells == {("magnitude", 0.0), ("magnitude", 0.8), ("dns", 0.0), ("dns", 0.8)}
    for r in jsonl:
        assert r["cell_rows"] == ROWS_PER_CELL and r["block"] == "1x1"
        assert r["experiment"] == "tiny" and r["dataset"] == "mnist-sample"
        assert r["training"] == "natural"
    kinds = {(r["attack"], r["norm"], r["eps"], r["metric"]) for r in jsonl}
    assert kinds >= {("clean", "", None, "accuracy"), ("fgsm", "Linf", 0.1, "accuracy"),
                     ("fgsm", "Linf", 0.3, "accuracy"), ("pgd", "Linf", 0.3, "accuracy"),
                     ("deepfool", "L2", None, "rho"), ("deepfool", "Linf", None, "rho"),
                     ("cw", "L2", None, "mean_l2")}
    layers = {r["layer"] for r in jsonl if r["metric"] == "weight_sparsity"}
    assert layers == {"fc1", "fc2", "fc3", "total"}
    acts = {r["layer"] for r in jsonl if r["metric"] == "activation_sparsity"}
    assert acts == {"relu[0]", "relu[1]"}  # LeNet-300-100 calls one nn.ReLU twice
    for r in jsonl:
        if r["metric"] == "accuracy":
            assert 0.0 <= r["value"] <= 1.0
        if r["sparsity"] == 0.8 and r["method"] == "magnitude":
            assert r["weight_sparsity"] == pytest.approx(0.8, abs=1e-3)
    dense = [r for r in jsonl if r["sparsity"] == 0.0]
    by_method = {m: [(r["attack"], r["layer"], r["value"]) for r in dense if r["method"] == m]
                 for m in ("magnitude", "dns")}
    assert by_method["magnitude"] == by_method["dns"]  # the reused 0% cell


def test_cell_checkpoint_is_truly_sparse(tiny_run):
    out, _, _ = tiny_run
    path = next((out / "checkpoints/cells").glob("lenet-300-100_magnitude_1x1_0.8_0.pt"))
    state, meta = load_checkpoint(path)
    assert meta["cell_id"] == "lenet-300-100|magnitude|1x1|0.8|0"
    assert "fc1.values" in state and "fc1.weight" not in state  # SparseLinear storage


def test_resume_skips_finished_cells(tiny_run):
    out, _, _ = tiny_run
    before = (out / "results.jsonl").read_bytes()
    runner, result = run(out)
    assert runner.trained == [] and runner.cells_run == []
    assert result["ran"] == 0 and result["skipped"] == 4
    assert (out / "results.jsonl").read_bytes() == before  # nothing duplicated


def test_resume_after_torn_line(tiny_run, tmp_path):
    src, _, _ = tiny_run
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.yaml", "results.jsonl"):
        (out / name).write_bytes((src / name).read_bytes())
    (out / "checkpoints").mkdir()
    dense = "checkpoints/dense-lenet-300-100-seed0.pt"
    (out / dense).write_bytes((src / dense).read_bytes())
    lines = (src / "results.jsonl").read_bytes().splitlines(keepends=True)
    last_cell = json.loads(lines[-1])["cell_id"]
    # the last cell lost its final rows and its last line is cut mid-object (kill -9)
    (out / "results.jsonl").write_bytes(b"".join(lines[:-3]) + lines[-3][:25])
    store = ResultStore(out)
    assert last_cell not in store.cells and len(store.cells) == 3
    assert (out / "results.jsonl").read_bytes().endswith(b"\n")  # repaired on load
    runner, result = run(out)
    assert runner.trained == []  # the dense checkpoint is reused
    assert result["ran"] == 1 and len(runner.cells_run) == 1
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * ROWS_PER_CELL
    assert sum(r["cell_id"] == last_cell for r in rows) == ROWS_PER_CELL


def test_resume_with_other_settings_is_an_error(tiny_run):
    out, _, _ = tiny_run
    with pytest.raises(ConfigError, match="train.lr"):
        run(out, ["train.lr=0.5"])


@pytest.mark.parametrize("overrides,block,training,sparsity", [
    # PGD-AT fine-tuning of truly sparse 4x4-block modules
    (["grid.block_sizes=[[4, 4]]", "finetune.sparse_weights=true",
      "finetune.adversarial.enabled=true", "finetune.adversarial.steps=2"], "4x4", "pgd-at", 0.5),
    # the cubic gradual schedule reaches the target by the end of fine-tuning
    (["prune.schedule=gradual", "finetune.epochs=2"], "1x1", "natural", 0.5),
])
def test_other_pipelines(tmp_path, overrides, block, training, sparsity):
    runner, result = run(tmp_path, ["grid.methods=[magnitude]", f"grid.sparsities=[{sparsity}]",
                                    "eval.cw.enabled=false"] + overrides)
    assert result["ran"] == 1 and runner.cells_run == [("magnitude", sparsity)]
    rows = result["rows"]
    assert {(r["block"], r["training"]) for r in rows} == {(block, training)}
    assert rows[0]["weight_sparsity"] == pytest.approx(sparsity, abs=0.01)
    state, _ = load_checkpoint(next((tmp_path / "checkpoints/cells").glob("*.pt")))
    assert state["fc1.values"].shape[1:] == tuple(int(b) for b in block.split("x"))


def test_missing_dataset_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        run(out, ["data.dataset=mnist", f"data.root={tmp_path}"])
    assert not out.exists()


# ---- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quick", "guo2018-mnist", "guo2018-fmnist", "granularity",
                                  "sparse-pgd-at"])
def test_presets_load_and_validate(name):
    assert name in preset_names()
    cfg = load_config(name)
    assert cfg.name == name
    assert load_config(None, [f"{k}={json.dumps(v)}" for k, v in to_dict(cfg).items()]) == cfg


def test_quick_preset_is_the_make_run_job():
    cfg = load_config("quick")
    assert cfg.grid.models == ["lenet-300-100"] and cfg.grid.methods == ["magnitude"]
    assert cfg.grid.sparsities == [0.0, 0.5, 0.8, 0.9, 0.95, 0.98] and cfg.grid.seeds == [0]
    assert cfg.data.dataset == "mnist-sample" and cfg.eval.images == 500
    assert cfg.eval.fgsm.enabled and cfg.eval.pgd.enabled and cfg.eval.deepfool.enabled


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 2, "learning_rate": 0.1}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.learning_rate'"):
        load_config(path)
    path.write_text(yaml.safe_dump({"trian": {"epochs": 2}}))
    with pytest.raises(ConfigError, match="'trian'"):
        load_config(path)


def test_unknown_key_in_set_is_an_error():
    with pytest.raises(ConfigError, match=r"eval\.pgd\.stpes"):
        load_config("quick", ["eval.pgd.stpes=10"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config("quick", ["train.epochs.x=1"])


@pytest.mark.parametrize("override,key", [
    ("train.epochs=many", "train.epochs"), ("train.epochs=2.5", "train.epochs"),
    ("train.lr=fast", "train.lr"), ("eval.fgsm.enabled=1", "eval.fgsm.enabled"),
    ("grid.sparsities=0.5", "grid.sparsities"), ("grid.block_sizes=[[4]]", "grid.block_sizes"),
    ("grid.methods=[prune]", "grid.methods"), ("train.optimizer=rmsprop", "train.optimizer"),
    ("data.train_size=null", None),
])
def test_set_type_checking(override, key):
    if key is None:
        assert load_config("quick", [override]).data.train_size is None
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("quick", [override])


def test_set_values():
    cfg = load_config("quick", ["train.lr=1e-3", "grid.block_sizes=[[4, 4], [16, 8]]",
                                "eval.cw.images=null", "finetune.adversarial.enabled=true"])
    assert cfg.train.lr == 1e-3 and cfg.grid.block_sizes == [(4, 4), (16, 8)]
    assert cfg.eval.cw.images is None and cfg.finetune.adversarial.enabled


@pytest.mark.parametrize("overrides,key", [
    (["grid.sparsities=[0, 1.0]"], "grid.sparsities"),
    (["grid.methods=[dns]", "grid.block_sizes=[[4, 4]]"], "grid.block_sizes"),
    (["grid.methods=[dns]", "finetune.sparse_weights=true"], "finetune.sparse_weights"),
    (["eval.pgd.eps=[0.1, 2]"], "eval.pgd.eps"),
    (["grid.seeds=[0, 0]"], "grid.seeds"),
    (["grid.models=[lenet-301]"], r"grid.models\[0\]"),
    (["data.dataset=mnist-full"], "data.dataset"),
])
def test_invalid_values_are_errors(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config("quick", overrides)


def test_defaults_are_valid():
    assert load_config(None) == ExperimentConfig()


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_print_config(capsys):
    sparsekern_main(["experiment", "--config", "quick", "--set", "grid.seeds=[0,1]",
                     "--print-config"])
    out = capsys.readouterr().out
    assert "name: quick" in out and "# 12 cells -> runs/quick" in out


def test_cli_config_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        sparsekern_main(["experiment", "--config", "quick", "--set", "nope=1"])
    assert e.value.code == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sparsekern_main(["experiment", "--config", "no-such-preset"])
    assert e.value.code == 2


def test_cli_requires_config():
    with pytest.raises(SystemExit):
        sparsekern_main(["experiment"])


@pytest.mark.parametrize("flags, retained", [([], True), (["--malloc-defaults"], False)])
def test_cli_retains_freed_memory_for_cpu_runs(monkeypatch, capsys, tmp_path, flags, retained):
    import sparsekern.experiment.runner as runner
    import sparsekern.memory as memory
    calls = []
    monkeypatch.setattr(memory, "retain_freed_cpu_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(runner, "run_experiment", lambda cfg, out, progress: {
        "summary": "", "ran": 0, "skipped": 0, "plots": []})
    assert sparsekern_main(["experiment", "--config", "quick", "--out", str(tmp_path),
                            "--no-progress", *flags]) in (0, None)
    assert bool(calls) == retained
