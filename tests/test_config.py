"""Config loading: precedence, every shipped YAML validates, and each class of mistake gets a one-line message."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ringtrain.cli import main
from ringtrain.config import save_config
from ringtrain.errors import ConfigError
from ringtrain.validate import load_validated_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("**/*.yaml"))
GOOD = {"model": {"arch": "llama"}, "train": {"output_dir": "runs/test", "seq_len": 64}}


def _write(tmp_path: Path, data, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _validate(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["validate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained: a real model.path."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).save_pretrained(path)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, capsys, model_dir):
    model_path = (yaml.safe_load(path.read_text())["model"] or {}).get("path")
    # A config that starts from another run's export (passkey_extend.yaml) validates once that export exists.
    extra = [f"model.path={model_dir}"] if model_path and not Path(model_path).exists() else []
    rc, out, err = _validate(capsys, path, *extra)
    assert rc == 0, err
    resolved = yaml.safe_load(out)
    assert set(resolved) == {"model", "rope", "parallel", "data", "optim", "peft", "train", "checkpoint", "logging",
                             "eval"}
    assert resolved == yaml.safe_load(yaml.safe_dump(resolved))  # printable and reloadable


def test_shipped_configs_exist():
    assert any(p.name == "tiny_cpu.yaml" for p in SHIPPED)


def test_precedence_defaults_file_overrides(tmp_path):
    path = _write(tmp_path, {**GOOD, "optim": {"lr": 1e-3, "warmup_steps": 7}})
    cfg = load_validated_config(path, ["optim.lr=5e-4", "parallel.sp_size=2", "model.config={hidden_size: 64}"])
    assert cfg.optim.lr == 5e-4  # override beats file
    assert cfg.optim.warmup_steps == 7  # file beats default
    assert cfg.optim.schedule == "cosine"  # default
    assert cfg.parallel.sp_size == 2
    assert cfg.model.config == {"hidden_size": 64}


def test_override_coercion(tmp_path):
    path = _write(tmp_path, GOOD)
    cfg = load_validated_config(path, ["train.fsdp=false", "optim.betas=[0.8,0.9]", "logging.tags=a,b", "model.path=null",
                             "train.max_steps=1_000", "optim.lr=1"])
    assert cfg.train.fsdp is False and cfg.optim.betas == [0.8, 0.9] and cfg.logging.tags == ["a", "b"]
    assert cfg.model.path is None and cfg.train.max_steps == 1000 and cfg.optim.lr == 1.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_validated_config(_write(tmp_path, GOOD), ["optim.lr=2e-4"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_validated_config(saved) == cfg


BAD_FILES = [
    ("unknown-section", {**GOOD, "optimizer": {"lr": 1}}, [], r"unknown key 'optimizer': did you mean 'optim'\?"),
    ("typo-key", {**GOOD, "optim": {"lrr": 1e-3}}, [], r"unknown key 'optim\.lrr': did you mean 'optim\.lr'\?"),
    ("misplaced-key", {**GOOD, "train": {**GOOD["train"], "lr": 1e-3}}, [],
     r"unknown key 'train\.lr': did you mean 'optim\.lr'\?"),
    ("section-not-mapping", {**GOOD, "optim": 3}, [], r"optim must be a mapping of keys, got 3"),
    ("missing-required", {"model": {"arch": "llama"}}, [],
     r"missing required key 'train\.output_dir': set it in the YAML file or as train\.output_dir=\.\.\."),
    ("missing-model", {"train": GOOD["train"]}, [], r"model\.path is missing: set model\.path .* or model\.arch"),
    ("bad-arch", {**GOOD, "model": {"arch": "lama"}}, [], r"model\.arch='lama' is not a transformers model type: "
                                                          r"did you mean 'llama'\?"),
    ("seq-len-multiple", {**GOOD, "parallel": {"sp_size": 2}, "train": {"output_dir": "x", "seq_len": 510}}, [],
     r"train\.seq_len=510 is not a multiple of 4 \(2 x parallel\.sp_size=2, balanced layout\): use train\.seq_len=512"),
    ("seq-len-multiple-ulysses", {**GOOD, "parallel": {"sp_size": 4, "ulysses_size": 2},
                                  "train": {"output_dir": "x", "seq_len": 1004}}, [],
     r"train\.seq_len=1004 is not a multiple of 8 \(2 x ring size 2 x parallel\.ulysses_size=2, balanced layout\): "
     r"use train\.seq_len=1008"),
    # Issue 13: the Ulysses degree against sp_size and the model's heads, naming the numbers and the choices.
    ("ulysses-not-dividing", {**GOOD, "parallel": {"sp_size": 4, "ulysses_size": 3}}, [],
     r"parallel\.ulysses_size=3 does not divide parallel\.sp_size=4: choose ulysses_size among 1, 2, 4"),
    ("ulysses-query-heads", {**GOOD, "model": {"arch": "llama", "config": {"num_attention_heads": 6,
                                                                          "num_key_value_heads": 2,
                                                                          "hidden_size": 96}},
                             "parallel": {"sp_size": 4, "ulysses_size": 4}}, [],
     r"parallel\.ulysses_size=4: 6 query heads are not divisible by ulysses size 4: choose among 1, 2, 3, 6 "
     r"\(model: 6 query heads, 2 key/value heads\)"),
    ("ulysses-kv-heads", {**GOOD, "model": {"arch": "llama", "config": {"num_attention_heads": 12,
                                                                       "num_key_value_heads": 3,
                                                                       "hidden_size": 96}},
                          "parallel": {"sp_size": 4, "ulysses_size": 4}}, [],
     r"parallel\.ulysses_size=4: 3 key/value heads with ulysses size 4: need kv_heads % ulysses == 0 or "
     r"ulysses % kv_heads == 0 .*\(model: 12 query heads, 3 key/value heads\)"),
]

BAD_OVERRIDES = [
    ("wrong-type-number", ["optim.lr=fast"], r"optim\.lr='fast': expected a number, got str"),
    ("wrong-type-int", ["train.max_steps=1.5"], r"train\.max_steps=1\.5: expected an integer, got float"),
    ("wrong-type-bool", ["train.fsdp=maybe"], r"train\.fsdp='maybe': expected true or false, got str"),
    ("bad-enum", ["optim.schedule=cosin"], r"optim\.schedule='cosin' is not one of cosine, linear, constant"),
    ("negative-lr", ["optim.lr=-0.001"], r"optim\.lr=-0\.001 must be > 0"),
    ("bad-layout", ["parallel.layout=ring"], r"parallel\.layout='ring' is not one of zigzag, contiguous"),
    ("bad-wandb-mode", ["logging.wandb_mode=cloud"], r"logging\.wandb_mode='cloud' is not one of disabled"),
    ("bad-rope-method", ["rope.method=yarnn"], r"rope\.method='yarnn'"),
    ("bad-keep-last", ["checkpoint.keep_last=0"], r"checkpoint\.keep_last=0"),
    ("offload-without-ac", ["train.offload_activations=true"],
     r"train\.offload_activations=true needs train\.activation_checkpointing=true"),
    ("override-syntax", ["optim.lr"], r"override 'optim\.lr' must look like section\.key=value"),
    ("override-unknown", ["optim.learning_rate=1e-3"], r"unknown key 'optim\.learning_rate'"),
    ("bad-depth", ["eval.depths=[0.5,1.5]"], r"eval\.depths=\[0\.5, 1\.5\] must lie in \[0, 1\]"),
]


@pytest.mark.parametrize("name,data,overrides,pattern", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_is_one_line_exit_2(tmp_path, capsys, name, data, overrides, pattern):
    rc, out, err = _validate(capsys, _write(tmp_path, data), *overrides)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]


# Issue 15: the model itself, checked before any rank builds it (the meta-device model and the saved weights).
BAD_MODELS = [
    ("unknown-config-key", ["model.config.hidden_sizee=64"],
     r"unknown key 'model\.config\.hidden_sizee' for LlamaConfig: did you mean 'model\.config\.hidden_size'\?"),
    ("wrong-type", ["model.config.vocab_size=abc"],
     r"model\.config\.vocab_size='abc' is rejected by LlamaConfig: TypeError: Field 'vocab_size' expected int, "
     r"got str"),
    ("transformers-validator", ["model.config.initializer_range=2.0"],
     r"model\.config\.initializer_range=2\.0 is rejected by LlamaConfig: ValueError: Value must be greater or equal to "
     r"0\.0 and smaller or equal to 1\.0"),
    ("heads-vs-hidden", ["model.config.hidden_size=128", "model.config.num_attention_heads=3"],
     r"model\.config\.num_attention_heads=3 does not divide model\.config\.hidden_size=128: choose "
     r"num_attention_heads among 1, 2, 4, 8, 16, 32, 64, 128, or set model\.config\.head_dim"),
    ("kv-vs-heads", ["model.config.num_key_value_heads=3"],
     r"model\.config\.num_key_value_heads=3 does not divide model\.config\.num_attention_heads=32 .*: choose "
     r"num_key_value_heads among 1, 2, 4, 8, 16, 32$"),
    ("odd-head-dim", ["model.config.hidden_size=96"],
     r"model\.config\.head_dim=3 \(hidden_size / num_attention_heads = 96 / 32\) is odd: RoPE rotates pairs"),
    ("zero-layers", ["model.config.num_hidden_layers=0"], r"model\.config\.num_hidden_layers=0 must be >= 1$"),
    ("not-causal", ["model.arch=t5"],
     r"model\.arch='t5': model type 't5' has no causal language model in transformers \(AutoModelForCausalLM\)"),
    ("rope-shorter", ["rope.method=yarn", "rope.target_length=1000"],
     r"rope\.target_length=1000 is shorter than the pretraining length 2048"),
    ("missing-path", ["model.arch=null", "model.path=runs/never_trained/final_model"],
     r"model\.path='runs/never_trained/final_model' does not exist \(relative to .*\): fix the path, or first run "
     r"what writes it"),
]


@pytest.mark.parametrize("name,overrides,pattern", BAD_OVERRIDES + BAD_MODELS,
                         ids=[b[0] for b in BAD_OVERRIDES + BAD_MODELS])
def test_bad_override_is_one_line_exit_2(tmp_path, capsys, name, overrides, pattern):
    import re

    rc, out, err = _validate(capsys, _write(tmp_path, GOOD), *overrides)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("world,overrides,pattern", [
    (4, ["parallel.sp_size=3"], r"parallel\.sp_size=3 does not divide world size 4: choose sp_size among 1, 2, 4"),
    (4, ["parallel.sp_size=2", "parallel.dp_size=3"],
     r"parallel\.dp_size=3 x parallel\.sp_size=2 = 6 != world size 4: set dp_size=2 or dp_size=0 \(auto\)"),
])
def test_parallel_sizes_against_world(tmp_path, capsys, world, overrides, pattern):
    import re

    rc, _, err = _validate(capsys, _write(tmp_path, GOOD), f"--world-size={world}", *overrides)
    assert rc == 2
    assert re.search(pattern, err), err


@pytest.mark.parametrize("content,pattern", [
    ("model: {arch: llama\ntrain: [", r"is not valid YAML at line \d+, column \d+"),
    ("- a\n- b\n", r"must hold a mapping of sections, got list"),
])
def test_unparseable_files(tmp_path, capsys, content, pattern):
    import re

    rc, _, err = _validate(capsys, _write(tmp_path, content))
    assert rc == 2 and re.search(pattern, err), err


def test_missing_file(tmp_path, capsys):
    rc, _, err = _validate(capsys, tmp_path / "nope.yaml")
    assert rc == 2 and "nope.yaml' does not exist: check the path" in err


def test_bad_model_folders(tmp_path, capsys, model_dir):
    """model.path: a folder without config.json, one without weights, a file, overrides that break the weights'
    shapes, and a key transformers would silently drop when it loads a folder."""
    import re
    import shutil

    (tmp_path / "empty").mkdir()
    shutil.copytree(model_dir, tmp_path / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    cases = [
        (["model.path=" + str(tmp_path / "empty")], r"model\.path='.*empty' is a folder without config\.json"),
        (["model.path=" + str(tmp_path / "no_weights")],
         r"model\.path='.*no_weights' holds no weights \(\*\.safetensors or pytorch_model\*\.bin\)"),
        (["model.path=" + str(model_dir / "config.json")], r"model\.path='.*config\.json' is a file"),
        ([f"model.path={model_dir}", "model.config.hidden_size=64"],
         r"model\.embed_tokens\.weight is \[384, 32\] in the folder but \[384, 64\] in the model built from its "
         r"config \(\d+ tensor\(s\) differ\): remove the model\.config overrides that change shapes \(hidden_size\)"),
        ([f"model.path={model_dir}", "model.config.num_key_value_head=2"],
         r"unknown key 'model\.config\.num_key_value_head' for LlamaConfig \(transformers would silently ignore it\): "
         r"did you mean 'model\.config\.num_key_value_heads'\?"),
    ]
    for overrides, pattern in cases:
        rc, out, err = _validate(capsys, _write(tmp_path, {**GOOD, "model": {}}), *overrides)
        assert rc == 2 and out == "", (overrides, err)
        assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), (overrides, err)


def test_model_type_errors_are_all_reported(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_validated_config(_write(tmp_path, GOOD), ["model.config.vocab_size=abc", "model.config.hidden_size=1.5"])
    assert [p.split(" is rejected")[0] for p in info.value.problems] == \
           ["model.config.vocab_size='abc'", "model.config.hidden_size=1.5"]


@pytest.mark.parametrize("command", ["validate", "rope", "eval"])
def test_missing_model_path_is_reported_before_any_work(capsys, command):
    """The issue's case: passkey_extend.yaml before passkey_short has been trained (no huggingface_hub traceback)."""
    if (ROOT / "runs/passkey_short/final_model").exists():
        pytest.skip("stage 1 of the context-extension demo has been run here")
    rc = main([command, str(ROOT / "configs/passkey_extend.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == ("error: model.path='runs/passkey_short/final_model' does not exist (relative to "
                   f"{Path.cwd()}): fix the path, or first run what writes it (a finished run exports its model to "
                   "<train.output_dir>/final_model)\n")


def test_every_problem_is_collected(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_validated_config(_write(tmp_path, {**GOOD, "optim": {"lrr": 1, "schedule": 5}}), ["train.max_steps=x"])
    joined = "\n".join(info.value.problems)
    assert len(info.value.problems) == 3, joined
    assert "optim.lrr" in joined and "optim.schedule" in joined and "train.max_steps" in joined


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ringtrain.cli", "validate", str(_write(tmp_path, GOOD)), "optim.lr=-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: optim.lr=-1.0 must be > 0 (e.g. 3e-4)"
    assert "Traceback" not in proc.stderr


def test_configuration_reference_is_current():
    from ringtrain.config import render_config_reference

    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render_config_reference() + "\n", "run: python scripts/gen_config_docs.py"
    assert "| `optim.lr` | a number | `0.0003` | Peak learning rate" in committed


def test_rope_command_reports_scaling(capsys):
    rc = main(["rope", str(ROOT / "configs/tiny_cpu.yaml"), "rope.method=yarn", "rope.factor=8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "'rope_type': 'yarn'" in out and "target length=8192" in out
    assert "interpolated" in out and "extrapolated" in out
    rc = main(["rope", str(ROOT / "configs/tiny_cpu.yaml"), "rope.method=yarnn"])
    assert rc == 2 and "rope.method='yarnn'" in capsys.readouterr().err


def test_config_package_is_a_leaf():
    """Importing the config loads no runtime module (nor torch): every component can import its section from it."""
    code = ("import sys, ringtrain.config\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('ringtrain', 'torch', 'transformers')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded, "the check must see the config package itself"
    outside = [m for m in loaded if not (m == "ringtrain" or m.startswith("ringtrain.config") or m == "ringtrain.errors")]
    assert outside == [], outside


def test_load_config_never_returns_none(tmp_path):
    """A missing required key (train.output_dir) leaves nothing to build: an error naming it, never None."""
    from ringtrain.config import load_config, parse_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "llama"}}))
    with pytest.raises(ConfigError, match=r"missing required key 'train\.output_dir'"):
        load_config(path)
    cfg, problems = parse_config(path)
    assert cfg is not None and cfg.train is None and any("train.output_dir" in p for p in problems)


def test_package_has_no_import_circle():
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "import_circles.py"
    if not tool.exists():
        pytest.skip(f"{tool} is not here (it ships in the shared/ folder beside the repository)")
    root = Path(__file__).resolve().parents[1] / "ringtrain"
    proc = subprocess.run([sys.executable, str(tool), str(root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
