"""What a new paper should not have to get right by hand (issue 21): the run's config.yaml at its
root, the main model and card kind a paper declares, a card right for that kind (library, pipeline
tag, loading snippet, hyper-parameters apart from metrics, the reproduce command), a stage's plots
in the upload, ``athanor submit`` checking the recipe's config first, and a quiet log.

Each failed before: config.yaml only in stage folders; the main model picked alphabetically; the
card said transformers/text-generation/AutoModelForCausalLM for a plain torch module, listed ``lr``
as a metric and "Reproduce: (not recorded…)"; the stage's PNG was left out; ``submit --dry-run``
exited 0 on an unknown key; "Loading weights from local directory" was printed on every load."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import nn

from athanor import hub
from athanor.hub import HubConfig
from athanor.config import TrainConfig
from athanor.runner import Paper, Stage, run
from conftest import ROOT


class Net(nn.Module, PyTorchModelHubMixin):
    def __init__(self, width: int = 3):
        super().__init__()
        self.linear = nn.Linear(width, 1)


@dataclass
class NetSection:
    width: int = 3


@dataclass
class NetConfig(TrainConfig):
    net: NetSection = field(default_factory=NetSection)
    hub: HubConfig = field(default_factory=HubConfig)  # it declares a main model: it publishes


def _other(ctx):
    """A transformers-looking model in a folder that sorts before the paper's main one."""
    folder = ctx.dir / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    return {}


def _net(ctx):
    Net(ctx.cfg.net.width).save_pretrained(ctx.dir / "model")
    (ctx.dir / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nstage plot")  # a stage's plot, beside its model
    return {"mse": 0.25}


def _report(ctx, results):
    report = {"mse": results["net"]["mse"], "lr": ctx.cfg.optim.lr, "width": ctx.cfg.net.width, "steps": 3}
    (ctx.root / "report.json").write_text(json.dumps(report))
    return report


PAPER = Paper("net", NetConfig, lambda cfg: [Stage("aaa", _other), Stage("net", _net)], _report,
              main_model="net/model", card="torch")


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    run(PAPER, ["--run.output_dir", str(out), "--optim.lr", "0.02", "--net.width", "5"])
    return out


def test_the_run_root_holds_its_config_and_record(finished):
    assert "width: 5" in (finished / "config.yaml").read_text()
    record = json.loads((finished / "RUN.json").read_text())
    assert record["main_model"] == "net/model" and record["card"] == "torch"
    assert "--net.width 5" in record["command"]


def test_publish_puts_the_declared_main_model_on_top_with_a_card_for_its_kind(finished, tmp_path):
    stage, card = hub.build_upload_folder(finished, "me/net", tmp_path / "stage")
    assert json.loads((stage / "config.json").read_text()) == {"width": 5}  # the paper's model, not aaa/
    assert (stage / "aaa" / "model" / "config.json").is_file() and (stage / "net" / "loss.png").is_file()
    assert (stage / "training_config.yaml").read_text() == (finished / "config.yaml").read_text()
    assert Net.from_pretrained(stage).linear.in_features == 5
    assert card.data.library_name is None and card.data.pipeline_tag is None and "pytorch" in card.data.tags
    assert "AutoModelForCausalLM" not in card.text and "load_file(hf_hub_download('me/net'" in card.text
    assert {r.metric_name for r in card.data.eval_results} == {"mse"}  # lr and width are settings
    hyper = card.text.split("## Hyper-parameters reported")[1].split("##")[0]
    assert "| lr | 0.02 |" in hyper and "| width | 5 |" in hyper
    reproduce = card.text.split("## Reproduce")[1]
    assert "--net.width 5" in reproduce and "not recorded" not in reproduce


def test_a_declared_main_model_that_is_missing_is_one_line(finished, tmp_path):
    import shutil

    shutil.rmtree(finished / "net" / "model")
    with pytest.raises(hub.PublishInputError, match="the paper's main model net/model is not saved there"):
        hub.build_upload_folder(finished, "me/net", tmp_path / "stage")


def test_a_transformers_model_that_is_no_causal_lm_gets_no_text_generation_card(tmp_path):
    from huggingface_hub import ModelCard

    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    card = hub.build_model_card(tmp_path / "run", folder, "me/enc", ["config.json"])
    assert isinstance(card, ModelCard) and card.data.library_name == "transformers"
    assert card.data.pipeline_tag is None and "AutoModel.from_pretrained" in card.text


def test_a_declared_model_class_and_a_custom_pipeline_get_their_own_loading_snippet(tmp_path):
    """A paper's declared class loads its model (the card says how); an athanor diffusers pipeline
    (pipeline.py beside model_index.json) needs trust_remote_code."""
    run_dir = tmp_path / "run"
    pipe = run_dir / "pipeline"
    pipe.mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": ["pipeline", "DMD2Pipeline"]}))
    card = hub.build_model_card(run_dir, pipe, "me/gen", ["model_index.json"], command="python recipes/dmd2.py",
                                kind="diffusers")
    assert card.data.library_name == "diffusers" and "trust_remote_code=True" in card.text
    card = hub.build_model_card(run_dir, pipe, "me/gen", [], command="x", kind="torch",
                                model_class="athanor.parts.classifier:MLP")
    assert "from athanor.parts.classifier import MLP\nmodel = MLP.from_pretrained('me/gen')" in card.text


def test_a_paper_that_declares_a_main_model_needs_a_hub_section(tmp_path, capsys):
    no_hub = Paper("nohub", TrainConfig, lambda cfg: [], _report, main_model="model", card="torch")
    with pytest.raises(SystemExit) as stop:
        run(no_hub, ["--run.output_dir", str(tmp_path / "o")])
    assert stop.value.code == 2 and "needs a `hub: HubConfig` section" in capsys.readouterr().err


def _athanor(*args):
    return subprocess.run([sys.executable, "-m", "athanor.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_submit_checks_the_recipes_config_before_writing_a_script():
    proc = _athanor("submit", "--dry-run", "recipes/template.py", "--template.alpha", "7")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'template'"), lines


def test_a_run_into_a_log_file_has_no_bars_and_no_library_chatter(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "template.py"), "--run.output_dir", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "Loading weights" not in out and "Setting accelerator" not in out and "\r" not in out, out[-2000:]
    assert [line for line in out.splitlines() if line.strip()] == [proc.stdout.strip()]  # the closing line alone
