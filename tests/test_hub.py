"""Publishing: the upload folder of a finished run loads back and carries a valid card; uploads go
through huggingface_hub (HF_ENDPOINT at a local address) and fail with one clear line."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from athanor import hub
from athanor.config import ConfigError, load_config
from conftest import ROOT, free_port, run_recipe

REPO = "me/tiny-gpt"
TINY = ["--run.max_steps", "6", "--model.d_model", "32", "--model.n_layers", "1", "--data.max_chars", "100000",
        "--data.eval_batches", "2", "--run.progress", "false"]


def athanor(*args, **env):
    return subprocess.run([sys.executable, "-m", "athanor.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny pretrain run with hub.push_to_hub on, offline: it trains, saves, then fails to publish."""
    out = tmp_path_factory.mktemp("hub") / "run"
    proc = run_recipe("pretrain", *TINY, "--run.output_dir", str(out), "--hub.push_to_hub", "true",
                      "--hub.repo_id", REPO, check=False)
    return out, proc


# ---------------------------------------------------------------------- the config switch

def test_push_to_hub_needs_a_valid_repo_id_at_parse_time():
    from athanor.methods.pretrain import PretrainConfig

    assert load_config(PretrainConfig, []).hub.push_to_hub is False  # off by default
    with pytest.raises(ConfigError, match="hub.push_to_hub=true needs hub.repo_id"):
        load_config(PretrainConfig, ["--hub.push_to_hub", "true"])
    with pytest.raises(ConfigError, match="expected user/name"):
        load_config(PretrainConfig, ["--hub.repo_id", "no-slash"])


@pytest.mark.slow
def test_push_to_hub_at_the_end_of_a_recipe_fails_offline_with_one_line(finished):
    out, proc = finished
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: publishing to {REPO} failed: HF_HUB_OFFLINE=1 is set"), last
    assert f"athanor publish {out} --repo-id {REPO}" in last  # how to retry
    assert (out / "report.json").is_file() and (out / "model" / "model.safetensors").is_file()  # nothing lost


# ---------------------------------------------------------------------- the upload folder

@pytest.mark.slow
def test_publish_dry_run_builds_a_loadable_folder_with_a_valid_card(finished, tmp_path):
    out, _ = finished
    stage = tmp_path / "stage"
    proc = athanor("publish", out, "--repo-id", REPO, "--dry-run", "--staging-dir", stage)
    assert proc.returncode == 0 and "nothing uploaded" in proc.stdout, proc.stderr
    names = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "training_config.yaml",
            "report.md", "report.json", "loss.png", "metrics.jsonl"} <= names, names
    assert not any(n.startswith("checkpoint") or "optimizer" in n for n in names), names

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stage, trust_remote_code=True)  # the folder carries its code
    tokenizer = AutoTokenizer.from_pretrained(stage)
    saved = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    ids = tokenizer("To be, or not", return_tensors="pt").input_ids
    report = json.loads((out / "report.json").read_text())
    assert model(ids, labels=ids).loss.item() < report["initial_eval_loss"]  # the trained weights, not fresh ones

    card = ModelCard.load(stage / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"athanor", "pretraining"} <= set(card.data.tags) and card.data.model_name == "tiny-gpt"
    results = {r.metric_type: r for r in card.data.eval_results}
    for key in ("initial_eval_loss", "final_eval_loss"):
        assert results[key].metric_value == report[key] and results[key].dataset_name == "shakespeare"
    assert "steps" not in results and "n_params" not in results  # bookkeeping is not a metric
    reproduce = card.text.split("## Reproduce")[1]
    assert "recipes/pretrain.py" in reproduce and f"--hub.repo_id {REPO}" in reproduce  # the exact command
    assert "--run.max_steps 6" in reproduce
    assert (stage / "training_config.yaml").read_text() == (out / "config.yaml").read_text()


@pytest.mark.slow
def test_checkpoint_only_when_asked_and_its_optimizer_state_only_when_asked_again(finished, tmp_path):
    out, _ = finished
    weights_only = hub.build_upload_folder(out, REPO, tmp_path / "a", include_checkpoint=True)[0]
    names = {p.name for p in (weights_only / "checkpoint" / "step-6").iterdir()}
    assert "model-model.safetensors" in names and "trainer_state.json" in names  # the pickle-free layout
    assert not any(n.startswith("optimizer") for n in names), names
    full = hub.build_upload_folder(out, REPO, tmp_path / "b", include_optimizer_state=True)[0]
    assert (full / "checkpoint" / "step-6" / "optimizer-model.safetensors").is_file()


def test_adapter_and_pipeline_runs_are_published_as_such(tmp_path):
    """Other recipes save peft adapters or diffusers pipelines: those load back too."""
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = tmp_path / "lm-run"
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))
    get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(lm / "adapter")
    (lm / "report.json").write_text(json.dumps({"forget_accuracy": 0.25, "steps": 3}))
    stage, card = hub.build_upload_folder(lm, "me/lora")
    assert card.data.library_name == "peft" and card.data.eval_results[0].metric_value == 0.25
    fresh = GPT2LMHeadModel(base.config)
    assert isinstance(PeftModel.from_pretrained(fresh, stage), PeftModel)

    diff = tmp_path / "diffusion-run"
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(diff / "pipeline")
    stage, card = hub.build_upload_folder(diff, "me/ddpm")
    assert card.data.library_name == "diffusers" and (stage / "model_index.json").is_file()
    assert type(DiffusionPipeline.from_pretrained(stage)).__name__ == "DDPMPipeline"


# ---------------------------------------------------------------------- uploads and their errors

def test_bad_publish_input_exits_2(tmp_path):
    assert "no such run folder" in one_error_line(athanor("publish", tmp_path / "nope", "--repo-id", REPO))
    assert athanor("publish", tmp_path, "--repo-id", REPO).returncode == 2  # nothing saved in it
    proc = athanor("publish", tmp_path, "--repo-id", "no-slash")
    assert proc.returncode == 2 and "expected user/name" in one_error_line(proc)


@pytest.mark.slow
def test_offline_is_one_line(finished):
    out, _ = finished
    proc = athanor("publish", out, "--repo-id", REPO, HF_TOKEN="hf_test")
    assert proc.returncode == 1 and "HF_HUB_OFFLINE=1 is set" in one_error_line(proc)


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line(finished):
    out, _ = finished
    port = free_port()
    proc = athanor("publish", out, "--repo-id", REPO, HF_HUB_OFFLINE="0", HF_TOKEN="hf_test",
                   HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert proc.returncode == 1
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in one_error_line(proc)


class _RefusingHub(BaseHTTPRequestHandler):
    """Accepts repo creation and card validation, refuses the token on the upload itself."""

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        if self.path == "/api/repos/create":
            code, body = 200, {"url": f"http://127.0.0.1:{self.server.server_port}/{REPO}", "name": REPO}
        elif self.path == "/api/validate-yaml":
            code, body = 200, {}
        else:
            code, body = 401, {"error": "Invalid credentials in Authorization header"}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_unauthorised_upload_is_one_line(finished):
    out, _ = finished
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHub)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}"
        proc = athanor("publish", out, "--repo-id", REPO, "--private", HF_HUB_OFFLINE="0", HF_TOKEN="hf_test",
                       HF_ENDPOINT=endpoint)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 1
    assert f"the Hub at {endpoint} rejected the token (401 Unauthorized)" in one_error_line(proc)
    calls = [(method, path) for method, path, _ in server.seen]
    assert ("POST", "/api/repos/create") in calls
    assert ("POST", f"/api/models/{REPO}/preupload/main") in calls  # upload_folder itself got that far
    assert all(auth == "Bearer hf_test" for _, path, auth in server.seen if path.startswith("/api/models"))
