"""``--model hf:DIR`` and ``timm:NAME``: loading offline, the output adapter, default losses, refusals; Hugging Face
checkpoint directories (``checkpoint-N/``, ``trainer_state.json``, shards, tied weights); the missing-extra errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hessspec.checkpoints import (
    CheckpointError,
    apply_state_dict,
    expand_checkpoint_paths,
    load_checkpoint,
    resolve_step,
)
from hessspec.data.datasets import DatasetError, load_dataset
from hessspec.models import ModelError, UnknownModelError, build_model, default_loss
from hessspec.models import hf as hf_models
from tests.tiny_hf import char_tokenizer, save, tiny_bert, tiny_gpt2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save(tiny_gpt2(), tmp_path_factory.mktemp("gpt2") / "model")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save(tiny_bert(), tmp_path_factory.mktemp("bert") / "model")


def _ids(vocab: int = 32, shape=(3, 9)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------- hf:DIR


def test_gpt2_directory_loads_in_the_dtype_and_returns_the_logits(gpt2_dir):
    model = build_model(f"hf:{gpt2_dir}", dtype=torch.float64)
    reference = tiny_gpt2().double().eval()
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert hf_models.attention_implementation(model) == "eager" and model.config.use_cache is False
    assert default_loss(model) == "lm"
    ids = _ids()
    mask = torch.ones_like(ids)
    logits = model(input_ids=ids, attention_mask=mask, labels=ids)  # labels are dropped, not used for a loss
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 9, 32)
    torch.testing.assert_close(logits, reference(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(ids), logits, rtol=0, atol=0)  # positional input_ids
    # The adapter is hooks: names, class and state dict stay the model's own.
    assert list(model.state_dict()) == list(reference.state_dict())
    # sdpa is accepted (evaluated under the MATH kernel by the operators) and gives the same logits.
    sdpa = build_model(f"hf:{gpt2_dir}", dtype=torch.float64, attn_implementation="sdpa")
    assert hf_models.attention_implementation(sdpa) == "sdpa"
    torch.testing.assert_close(sdpa(ids), logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "expected"),
    [(3, None, "cross-entropy"), (1, None, "mse"), (2, "regression", "mse"), (3, "single_label_classification",
     "cross-entropy")],
)  # fmt: skip
def test_default_loss_follows_the_head(tmp_path, num_labels, problem_type, expected):
    directory = save(tiny_bert(num_labels, problem_type=problem_type), tmp_path / "bert")
    model = build_model(f"hf:{directory}")
    assert default_loss(model) == expected
    assert model(input_ids=_ids(shape=(2, 5))).shape == (2, num_labels)


def test_heads_without_a_default_loss_and_other_models(tmp_path):
    multi = build_model(f"hf:{save(tiny_bert(3, problem_type='multi_label_classification'), tmp_path / 'm')}")
    with pytest.raises(ModelError, match="problem_type 'multi_label_classification'.*--loss-factory"):
        default_loss(multi)
    from transformers import BertModel

    base = save(BertModel(tiny_bert().config), tmp_path / "base")
    with pytest.raises(ModelError, match="no task head.*pass --loss"):
        default_loss(build_model(f"hf:{base}"))
    assert default_loss(build_model("mlp")) == "cross-entropy"


def test_hf_directory_refusals(tmp_path, gpt2_dir):
    def refused(spec: str, pattern: str, **kwargs) -> None:
        with pytest.raises(ModelError, match=pattern) as caught:
            build_model(spec, **kwargs)
        assert "\n" not in str(caught.value)

    refused(f"hf:{tmp_path / 'nowhere'}", "does not exist; expected a directory written by save_pretrained")
    (tmp_path / "empty").mkdir()
    refused(f"hf:{tmp_path / 'empty'}", "has no config.json")
    refused(f"hf:{gpt2_dir}", "does not accept argument.*foo.*accepts: attn_implementation", foo=1)
    refused(f"hf:{gpt2_dir}", "attn_implementation must be one of eager, sdpa", attn_implementation="flash")

    config = json.loads((gpt2_dir / "config.json").read_text())
    cases = {
        "remote": ({**config, "auto_map": {"AutoModelForCausalLM": "mine.Model"}}, "needs custom code.*never runs"),
        "unknown": ({**config, "architectures": ["MyOwnLM"]}, "'MyOwnLM', which transformers .* does not provide"),
        "noarch": ({k: v for k, v in config.items() if k != "architectures"}, "names no model class"),
        "noweights": (config, "has no weights: expected one of model.safetensors"),
        "mismatch": ({**config, "n_embd": 4}, "cannot load|do not fit"),
    }
    for name, (content, pattern) in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(content))
        if name != "noweights":
            (directory / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
        refused(f"hf:{directory}", pattern)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    refused(f"hf:{tmp_path / 'broken'}", "not a readable JSON config")


def test_hf_weights_not_fitting_the_head_are_refused(tmp_path):
    # A classifier's weights under a config with another number of labels: transformers would re-initialise the
    # head at random; hessspec refuses.
    directory = save(tiny_bert(3), tmp_path / "bert")
    config = json.loads((directory / "config.json").read_text())
    config["id2label"] = {str(i): f"L{i}" for i in range(5)}
    config["label2id"] = {f"L{i}": i for i in range(5)}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="do not fit BertForSequenceClassification.*mismatched keys: .*classifier"):
        build_model(f"hf:{directory}")
    # An encoder's weights under a classifier's config: the head would be random.
    from transformers import BertModel

    encoder = save(BertModel(tiny_bert().config), tmp_path / "encoder")
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(ModelError, match="do not fit BertForSequenceClassification.*missing keys: .*classifier"):
        build_model(f"hf:{encoder}")


# --------------------------------------------------------------------------------------------------- timm:NAME


def test_timm_models_build_without_weights_and_with_exact_attention():
    vit_args = {"img_size": 16, "patch_size": 8, "embed_dim": 8, "depth": 1, "num_heads": 2, "num_classes": 3}
    vit = build_model("timm:vit_tiny_patch16_224", **vit_args)
    assert vit.blocks[0].attn.fused_attn is False
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    fused = build_model("timm:vit_tiny_patch16_224", attn_implementation="sdpa", **vit_args)
    assert fused.blocks[0].attn.fused_attn is True
    fused.load_state_dict(vit.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit.eval()(x), fused.eval()(x), rtol=1e-5, atol=1e-6)
    resnet = build_model("timm:resnet10t", num_classes=4, dtype=torch.float64)
    assert resnet.fc.out_features == 4 and resnet.fc.weight.dtype == torch.float64
    with pytest.raises(ModelError, match="without pretrained weights.*drop pretrained="):
        build_model("timm:resnet10t", pretrained=True)
    with pytest.raises(ModelError, match="drop checkpoint_path="):
        build_model("timm:resnet10t", checkpoint_path="x.pth")
    with pytest.raises(UnknownModelError, match="unknown timm model 'timm:resnet10x'.*did you mean timm:resnet10t"):
        build_model("timm:resnet10x")
    with pytest.raises(ModelError, match="cannot build timm:resnet10t"):
        build_model("timm:resnet10t", no_such_argument=3)


def test_timm_gets_num_classes_from_the_data_and_records_the_attention():
    from hessspec.runner.job import AnalysisJob

    job = AnalysisJob(model="timm:resnet10t", data="digits")
    assert job.effective_model_args() == {"attn_implementation": "eager", "num_classes": 10}
    assert AnalysisJob(model="hf:x", data="digits").effective_model_args() == {"attn_implementation": "eager"}
    text = AnalysisJob(model="hf:run/ckpt", data="text:a.txt", data_args={"seq_len": 8})
    assert text.effective_data_args() == {"seq_len": 8, "tokenizer": "run/ckpt"}
    assert "tokenizer" not in text.config()["data_args"]


# ------------------------------------------------------------------------------------------- missing extras


def test_missing_extras_give_one_line_saying_what_to_install(monkeypatch, tmp_path, gpt2_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    monkeypatch.setitem(sys.modules, "timm", None)
    hint = r"pip install 'hessspec\[hf\]'"
    with pytest.raises(ModelError, match=rf"--model hf:DIR needs the optional package 'transformers'.*{hint}"):
        build_model(f"hf:{gpt2_dir}")
    with pytest.raises(ModelError, match=rf"--model timm:resnet10t needs .*'timm'.*{hint}"):
        build_model("timm:resnet10t")
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(DatasetError, match=rf"--data text:FILE needs .*'transformers'.*{hint}"):
        load_dataset(f"text:{tmp_path / 'a.txt'}", tokenizer=str(gpt2_dir))


def test_missing_extra_through_the_command_line(tmp_path):
    # As a user without the extra runs it: the import fails in a fresh interpreter.
    torch.save(build_model("mlp", width=4, depth=1).state_dict(), tmp_path / "ckpt_1.pt")
    blocked = "import sys; sys.modules['timm'] = None; from hessspec.cli import main; main()"
    command = [
        sys.executable, "-c", blocked, "analyze", str(tmp_path / "ckpt_1.pt"), "--model", "timm:resnet10t",
        "--data", "digits", "--out", str(tmp_path / "out.h5"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "Error: --model timm:resnet10t needs the optional package 'timm', which is not installed: "
        "pip install 'hessspec[hf]'"
    ]
    assert not (tmp_path / "out.h5").exists()


# ------------------------------------------------------------------------------------- checkpoint directories


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> Path:
    """runs/checkpoint-{0,5,40}/ as the Trainer writes them (config, weights, trainer_state.json, optimizer)."""
    runs = tmp_path_factory.mktemp("runs")
    for seed, step in enumerate((0, 5, 40)):
        directory = save(tiny_gpt2(seed=seed), runs / f"checkpoint-{step}", step=step)
        torch.save({"state": {}, "param_groups": []}, directory / "optimizer.pt")
    return runs


def test_save_pretrained_directories_are_one_checkpoint_each(trainer_runs, tmp_path):
    expected = [trainer_runs / f"checkpoint-{s}" for s in (0, 40, 5)]  # by name; steps order them later
    assert expand_checkpoint_paths([str(trainer_runs / "checkpoint-*/")]) == expected
    assert expand_checkpoint_paths([str(trainer_runs / "checkpoint-*")]) == expected
    assert expand_checkpoint_paths([trainer_runs]) == expected
    assert expand_checkpoint_paths([trainer_runs / "checkpoint-5"]) == [trainer_runs / "checkpoint-5"]

    loaded = load_checkpoint(trainer_runs / "checkpoint-5")
    assert loaded.format == "hf-directory" and loaded.step == 5
    weights = (trainer_runs / "checkpoint-5" / "model.safetensors").read_bytes()
    assert loaded.sha256 == hashlib.sha256(weights).hexdigest()
    assert "lm_head.weight" not in loaded.state_dict  # tied to the input embedding, saved once
    model = build_model(f"hf:{trainer_runs / 'checkpoint-0'}", dtype=torch.float64)
    apply_state_dict(model, loaded.state_dict)
    trained = tiny_gpt2(seed=1)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor.double(), rtol=0, atol=0)
    assert model.lm_head.weight is model.transformer.wte.weight

    # The step: trainer_state.json's global_step first, else the directory's name.
    moved = tmp_path / "checkpoint-77"
    save(tiny_gpt2(), moved, step=12)
    assert resolve_step(load_checkpoint(moved), moved) == 12
    (moved / "trainer_state.json").unlink()
    assert load_checkpoint(moved).step is None and resolve_step(load_checkpoint(moved), moved) == 77


def test_sharded_and_bin_directories(tmp_path):
    model = tiny_gpt2(seed=3)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    loaded = load_checkpoint(tmp_path / "sharded")
    assert loaded.sha256 == hashlib.sha256(b"".join(p.read_bytes() for p in shards)).hexdigest()
    target = build_model(f"hf:{tmp_path / 'sharded'}")
    apply_state_dict(target, loaded.state_dict)
    torch.testing.assert_close(target.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert torch.equal(load_checkpoint(tmp_path / "bin").state_dict["lm_head.weight"], model.lm_head.weight)

    # A missing shard and a damaged weight file: one line each.
    shards[0].unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) model-00001-of-.* are missing"):
        load_checkpoint(tmp_path / "sharded")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read") as caught:
        load_checkpoint(tmp_path / "bin")
    assert "\n" not in str(caught.value)


def test_state_dict_files_of_a_model_with_tied_weights(tmp_path, gpt2_dir):
    from safetensors.torch import save_model

    model = tiny_gpt2(seed=4)
    save_model(model, str(tmp_path / "weights.safetensors"))  # stores the tied tensor once
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "ckpt.pt")
    for file in ("weights.safetensors", "ckpt.pt"):
        target = build_model(f"hf:{gpt2_dir}")
        apply_state_dict(target, load_checkpoint(tmp_path / file).state_dict)
        torch.testing.assert_close(target.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_token_ids_and_lengths_are_checked_against_the_model(gpt2_dir):
    model = build_model(f"hf:{gpt2_dir}")
    hf_models.check_token_ids(model, largest_id=31, length=16)
    with pytest.raises(ModelError, match=r"token id 32 but the model's vocabulary has 32 tokens \(ids 0..31\)"):
        hf_models.check_token_ids(model, largest_id=32, length=4)
    with pytest.raises(ModelError, match="sequences of 17 tokens but GPT2LMHeadModel has 16 positions; pass "
                       "--data-arg seq_len=16 or less"):  # fmt: skip
        hf_models.check_token_ids(model, largest_id=3, length=17)


def test_data_that_does_not_fit_the_model_is_one_line_through_the_cli(tmp_path, gpt2_dir):
    from click.testing import CliRunner

    from hessspec.cli import cli

    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. " * 8)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for file in gpt2_dir.iterdir():
        (model_dir / file.name).write_bytes(file.read_bytes())
    char_tokenizer(model_dir)
    base = ["analyze", str(model_dir), "--step", "0", "--model", f"hf:{model_dir}", "--data",
            f"text:{tmp_path / 'corpus.txt'}", "--out", str(tmp_path / "out.h5")]  # fmt: skip
    result = CliRunner().invoke(cli, [*base, "--data-arg", "seq_len=20"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: the data holds sequences of 20 tokens but GPT2LMHeadModel has 16 positions; pass --data-arg "
        "seq_len=16 or less"
    ]
    np.save(tmp_path / "ids.npy", np.full((3, 8), 40))
    result = CliRunner().invoke(cli, [*base[:6], "--data", f"tokens:{tmp_path / 'ids.npy'}", *base[8:]])
    assert result.exit_code == 1 and "token id 40 but the model's vocabulary has 32 tokens" in result.output
    assert not (tmp_path / "out.h5").exists()
